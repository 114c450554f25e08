"""Plans like a pretrained checkpoint: the 3d_fullres network is the checkpoint's, so every encoder weight loads.

``nnunet-ext plan -d D --like-pretrained CKPT_OR_ADAPTATION_PLAN`` plans the dataset with a planner as usual (its
transposition, resampling functions and nonzero-mask rule), then derives these plans from its 3d_fullres
configuration, as nnU-Net master's ``nnUNetv2_preprocess_like_nnssl -am like_pretrained`` does for nnssl
checkpoints:

- network: the checkpoint's architecture (:meth:`nnunet_ext.nnssl.AdaptationPlan.network`; ResEncL's keyword
  arguments for ``ResEncL`` checkpoints), built by released nnU-Net from its dotted class path;
- spacing: the pretraining's (the dataset's when the pretraining did not resample);
- normalization: the pretraining's scheme on every channel;
- patch size: the adaptation plan's ``recommended_downstream_patchsize`` (or ``--patch-size``), a multiple of the
  network's total stride on every axis; batch size 2;
- only the 3d_fullres configuration (the checkpoint is a 3-D network); its data identifier is the plans name's.

With ``group_norm`` the norm is our GroupNorm (for a study that compares CPC trainers, which train GroupNorm, with
the others): the checkpoint's instance-norm affine weights load into it, its statistics differ. The plans name the
checkpoint and what was taken from it under ``nnunet_ext_like_pretrained``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

from nnunet_ext.nnssl import AdaptationPlan
from nnunet_ext.planners.groupnorm import GROUP_NORM

CONFIGURATION = "3d_fullres"
PLANS_NAME = "nnUNetLikePretrainedPlans"
GROUP_NORM_PLANS_NAME = "nnUNetLikePretrainedGNPlans"
BATCH_SIZE = 2  # nnU-Net master's fine-tuning plans, and the smallest batch nnU-Net plans


def total_stride(strides: Sequence) -> list[int]:
    """The product of the per-stage strides on every axis."""
    per_axis = [[s] * 3 if isinstance(s, int) else list(s) for s in strides]
    return [math.prod(axis) for axis in zip(*per_axis)]


def like_pretrained_plans(base: dict, plan: AdaptationPlan, plans_name: str = PLANS_NAME, group_norm: bool = False,
                          patch_size: Sequence[int] | None = None) -> dict:
    """Plans whose 3d_fullres network, spacing, normalization and patch size are the checkpoint's (see the module
    docstring), derived from the dataset's ``base`` plans; ValueError naming what does not fit."""
    if CONFIGURATION not in base.get("configurations", {}):
        raise ValueError(f"--like-pretrained: the plans {base.get('plans_name')} have no {CONFIGURATION} "
                         f"configuration (is the dataset 2-D?); nnssl checkpoints are 3-D networks")
    architecture = plan.network()
    kwargs = architecture["arch_kwargs"]
    if group_norm:
        kwargs["norm_op"] = GROUP_NORM
    stride = total_stride(kwargs["strides"])
    patch = [int(s) for s in (patch_size or plan.recommended_patch_size)]
    given = "--patch-size" if patch_size else f"{plan.source}: recommended_downstream_patchsize"
    if len(patch) != len(stride) or any(p % s for p, s in zip(patch, stride)):
        raise ValueError(f"{given} {patch} is not a multiple of the network's total stride {stride} on every axis; "
                         f"give --patch-size with such edges")
    configuration = copy.deepcopy(base["configurations"][CONFIGURATION])
    channels = len(configuration["normalization_schemes"])
    pretrained_spacing = plan.pretrain_configuration.get("spacing")
    resampled = bool(pretrained_spacing) and None not in pretrained_spacing
    spacing = [float(s) for s in pretrained_spacing] if resampled else configuration["spacing"]
    schemes = list(plan.pretrain_configuration.get("normalization_schemes") or ["ZScoreNormalization"])
    if len(schemes) not in (1, channels):
        raise ValueError(f"{plan.source}: the pretraining normalized {len(schemes)} channels ({schemes}) and the "
                         f"dataset has {channels}; cannot tell which scheme goes to which channel")
    median = [round(n * old / new) for n, old, new in zip(configuration["median_image_size_in_voxels"],
                                                         configuration["spacing"], spacing)]
    configuration.update(data_identifier=f"{plans_name}_{CONFIGURATION}", batch_size=BATCH_SIZE, patch_size=patch,
                         spacing=spacing, median_image_size_in_voxels=median,
                         normalization_schemes=schemes * channels if len(schemes) == 1 else schemes,
                         architecture=architecture)
    plans = copy.deepcopy(base)
    plans.update(plans_name=plans_name, configurations={CONFIGURATION: configuration})
    plans["nnunet_ext_like_pretrained"] = {
        **plan.summary(), "planned_from": base.get("plans_name"), "network": architecture["network_class_name"],
        "norm_op": kwargs["norm_op"], "spacing": spacing,
        "spacing_from": "pretraining" if resampled else "dataset (the pretraining did not resample)",
        "dataset_spacing": base["configurations"][CONFIGURATION]["spacing"], "patch_size": patch}
    return plans


def describe(plans: dict) -> str:
    """One line on what the like-pretrained plans took from the checkpoint."""
    info = plans["nnunet_ext_like_pretrained"]
    configuration = plans["configurations"][CONFIGURATION]
    kwargs = configuration["architecture"]["arch_kwargs"]
    features = kwargs["features_per_stage"]
    schemes = "/".join(dict.fromkeys(configuration["normalization_schemes"]))
    return (f"{plans['plans_name']}: {info['architecture']} ({info['network'].rsplit('.', 1)[-1]}, "
            f"{kwargs['n_stages']} stages, features {features[0]}-{features[-1]}, norm "
            f"{info['norm_op'].rsplit('.', 1)[-1]}), spacing {configuration['spacing']} ({info['spacing_from']}; the "
            f"dataset's {info['dataset_spacing']}), normalization {schemes}, patch {configuration['patch_size']}, "
            f"batch {configuration['batch_size']}")
