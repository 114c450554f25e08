"""nnssl's checkpoint format, read as data: the adaptation plan, the architectures it names, and the mapping of its
encoder and stem onto a planned nnU-Net network.

nnssl (MIC-DKFZ/nnssl, the self-supervised pretraining framework behind the OpenMind checkpoints) is not a
dependency (it needs Python >= 3.12 and is CC-BY-SA); its files are read as plain data. What they hold, as read in
nnssl's source at commit 7044864 (``training/nnsslTrainer/AbstractTrainer.py::save_checkpoint``,
``adaptation_planning/adaptation_plan.py``, ``architectures/architecture_registry.py``):

- ``checkpoint_final.pth``: a dictionary with ``network_weights`` (the pretraining network's state dict, unwrapped
  from DDP and torch.compile), ``nnssl_adaptation_plan`` (below), the optimizer, logging and trainer state; OpenMind
  files may add ``citations``.
- ``adaptation_plan.json`` (and ``nnssl_adaptation_plan``): ``architecture_plans`` (``arch_class_name``: ``ResEncL``,
  ``NoSkipResEncL``, ``PrimusS/B/M/L``, ``ResidualEncoderUNet`` or ``PlainConvUNet``; ``arch_kwargs``: the network's
  keyword arguments for the last two, else null), ``pretrain_plan`` (nnssl's plans; its configuration holds the
  pretraining ``spacing``, ``normalization_schemes`` and ``patch_size``), ``pretrain_num_input_channels``,
  ``recommended_downstream_patchsize``, ``key_to_encoder`` and ``key_to_stem`` (state-dict prefixes, e.g.
  ``encoder.stages`` and ``encoder.stem``), ``keys_to_in_proj`` (the stem's input convolution under each of its
  names) and ``key_to_lpe`` (Primus' positional embedding).

The mapping follows nnU-Net master's fine-tuning path (``PretrainedTrainer.load_pretrained_weights``, read at
commit 0e49508): the encoder and stem are loaded under the planned network's prefixes, a stem pretrained on one
input channel is repeated over the plan's channels and divided by their number, the decoder and segmentation layers
start from scratch. As there (PyTorch's strict ``load_state_dict``), every encoder and stem tensor must fit; here the
refusal names what to plan. The pretraining network registers its encoder a second time under ``decoder.encoder``
(dynamic_network_architectures' U-Nets), so those file keys are the encoder's tensors under other names: recorded as
used, with the encoder key they alias. Transformer checkpoints (Primus) are refused by name, since no plan of
released nnU-Net builds them; master's ``DynamicPretrainedTrainer`` (kernels averaged, stages cut or added) is not
reproduced.
"""

from __future__ import annotations

import inspect
import json
import os
import pydoc
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

ADAPTATION_PLAN_KEY = "nnssl_adaptation_plan"
ADAPTATION_PLAN_FILE = "adaptation_plan.json"
RESIDUAL_ENCODER_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
PLAIN_CONV_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
KW_REQUIRES_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]  # as nnU-Net's planners write them
# nnssl's ResEnc-L (architecture_registry.get_res_enc_l; the same values in nnU-Net master's get_network_via_name)
RESENC_L = {
    "n_stages": 6,
    "features_per_stage": [32, 64, 128, 256, 320, 320],
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 6,
    "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
    "n_blocks_per_stage": [1, 3, 4, 6, 6, 6],
    "n_conv_per_stage_decoder": [1, 1, 1, 1, 1],
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-5, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}
# arch_class_name -> the network nnU-Net builds for it; NoSkipResEncL's encoder is ResEnc-L's (its decoder, which is
# never loaded, has no skips)
CNN_ARCHITECTURES = {"ResEncL": RESIDUAL_ENCODER_UNET, "NoSkipResEncL": RESIDUAL_ENCODER_UNET,
                     "ResidualEncoderUNet": RESIDUAL_ENCODER_UNET, "PlainConvUNet": PLAIN_CONV_UNET}
# the keyword argument of each network for the blocks (residual) or convolutions (plain) per encoder stage. nnssl's
# DynamicArchitecturePlans only has n_blocks_per_stage and its get_network_from_plans passes it on unchanged, which
# PlainConvUNet (n_conv_per_stage) does not take; it is renamed here (the per-stage count nnU-Net's planners write
# under either name), and every encoder tensor is still checked against the checkpoint when it loads
ENCODER_DEPTH = {RESIDUAL_ENCODER_UNET: "n_blocks_per_stage", PLAIN_CONV_UNET: "n_conv_per_stage"}
TRANSFORMERS = ("PrimusS", "PrimusB", "PrimusM", "PrimusL", "Primus")
REQUIRED = ("architecture_plans", "pretrain_plan", "pretrain_num_input_channels", "recommended_downstream_patchsize",
            "key_to_encoder", "key_to_stem", "keys_to_in_proj")


@dataclass(frozen=True)
class AdaptationPlan:
    """The parts of an nnssl adaptation plan that fine-tuning uses; ``source``: the checkpoint or
    ``adaptation_plan.json`` it was read from (an absolute path: it goes into plans, records and suggested
    commands)."""

    source: str
    architecture: str
    arch_kwargs: dict | None
    pretrain_num_input_channels: int
    recommended_patch_size: tuple[int, ...]
    key_to_encoder: str
    key_to_stem: str
    keys_to_in_proj: tuple[str, ...]
    key_to_lpe: str | None = None
    pretrain_configuration: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping, source: str) -> AdaptationPlan:
        """Read a serialized adaptation plan; raise ValueError naming ``source`` and what it lacks."""
        source = os.path.abspath(source)
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: the nnssl adaptation plan is not a JSON object")
        missing = [key for key in REQUIRED if key not in data]
        if missing:
            raise ValueError(f"{source}: the nnssl adaptation plan lacks {', '.join(missing)}; is it nnssl's "
                             f"adaptation_plan.json (or a checkpoint saved by an nnssl trainer)?")
        architecture = data["architecture_plans"] or {}
        configurations = (data["pretrain_plan"] or {}).get("configurations") or {}
        configuration = next(iter(configurations.values()), {})  # nnssl pretrains one configuration
        return cls(source=source, architecture=str(architecture.get("arch_class_name")),
                   arch_kwargs=architecture.get("arch_kwargs"),
                   pretrain_num_input_channels=int(data["pretrain_num_input_channels"]),
                   recommended_patch_size=tuple(int(s) for s in data["recommended_downstream_patchsize"]),
                   key_to_encoder=data["key_to_encoder"], key_to_stem=data["key_to_stem"],
                   keys_to_in_proj=tuple(data["keys_to_in_proj"]), key_to_lpe=data.get("key_to_lpe"),
                   pretrain_configuration=dict(configuration))

    @property
    def short_name(self) -> str:
        """The architecture's class name without its module."""
        return self.architecture.rsplit(".", 1)[-1]

    def network(self) -> dict:
        """The nnU-Net plans ``architecture`` entry that builds this checkpoint's network; ValueError for an
        architecture that cannot be mapped onto an nnU-Net CNN plan (named, with what to use instead)."""
        name = self.short_name
        if name.startswith(TRANSFORMERS):
            raise ValueError(f"{self.source}: the checkpoint's architecture is {name}, a Primus transformer (patch "
                             f"embedding and ViT blocks, key_to_encoder '{self.key_to_encoder}'), which cannot be "
                             f"mapped onto a CNN plan of released nnU-Net; nnunet_ext fine-tunes the CNN checkpoints "
                             f"({', '.join(CNN_ARCHITECTURES)}). For Primus use nnU-Net master's "
                             f"PretrainedTrainer_Primusx (documentation/finetuning_from_nnssl_checkpoints.md)")
        if name not in CNN_ARCHITECTURES:
            raise ValueError(f"{self.source}: unknown nnssl architecture '{self.architecture}'; nnunet_ext maps "
                             f"{', '.join(CNN_ARCHITECTURES)} onto nnU-Net plans")
        if name in ("ResEncL", "NoSkipResEncL"):
            kwargs = RESENC_L
        elif isinstance(self.arch_kwargs, Mapping):
            kwargs = self.arch_kwargs
        else:
            raise ValueError(f"{self.source}: architecture {name} without arch_kwargs; nnssl writes them for "
                             f"{name} checkpoints, so the adaptation plan is incomplete")
        network = CNN_ARCHITECTURES[name]
        kwargs = json.loads(json.dumps(kwargs))
        depth = ENCODER_DEPTH[network]
        other = next(k for k in ENCODER_DEPTH.values() if k != depth)
        if other in kwargs and depth not in kwargs:
            kwargs[depth] = kwargs.pop(other)
        self._check_kwargs(network, kwargs)
        return {"network_class_name": network, "arch_kwargs": kwargs, "_kw_requires_import": list(KW_REQUIRES_IMPORT)}

    def _check_kwargs(self, network: str, kwargs: Mapping) -> None:
        """ValueError naming the keyword arguments that ``network``'s constructor does not take or lacks (instead of
        the TypeError nnU-Net would raise when building it)."""
        cls = pydoc.locate(network)
        if cls is None:  # dynamic_network_architectures is nnU-Net's dependency; never reached with it installed
            return
        parameters = inspect.signature(cls.__init__).parameters
        given = {"input_channels", "num_classes", "deep_supervision"}  # nnU-Net passes these itself
        unknown = sorted(k for k in kwargs if k not in parameters)
        missing = sorted(k for k, p in parameters.items() if k != "self" and k not in kwargs and k not in given
                         and p.default is inspect.Parameter.empty)
        if unknown or missing:
            problems = [f"takes no {', '.join(unknown)}"] if unknown else []
            problems += [f"needs {', '.join(missing)}"] if missing else []
            raise ValueError(f"{self.source}: the adaptation plan's arch_kwargs do not build {self.short_name}: "
                             f"{network.rsplit('.', 1)[-1]} {' and '.join(problems)} (arch_kwargs: "
                             f"{', '.join(kwargs)})")

    def summary(self) -> dict:
        """What the training record says of the plan."""
        return {"architecture": self.architecture, "pretrain_num_input_channels": self.pretrain_num_input_channels,
                "key_to_encoder": self.key_to_encoder, "key_to_stem": self.key_to_stem,
                "keys_to_in_proj": list(self.keys_to_in_proj),
                "recommended_downstream_patchsize": list(self.recommended_patch_size),
                "pretrain_spacing": self.pretrain_configuration.get("spacing"),
                "pretrain_normalization": self.pretrain_configuration.get("normalization_schemes"),
                "adaptation_plan": self.source}


def plan_beside(filename: str) -> str:
    """The ``adaptation_plan.json`` in the folder of ``filename`` (which may not exist)."""
    return os.path.join(os.path.dirname(os.path.abspath(filename)), ADAPTATION_PLAN_FILE)


def is_nnunet_checkpoint(saved: object) -> bool:
    """Whether a loaded file is a checkpoint of an nnU-Net trainer: ``network_weights`` with nnU-Net's ``init_args``
    (``plans``, ``dataset_json``) or its ``inference_allowed_mirroring_axes``. nnssl's trainers save ``init_args``
    ``plan`` / ``pretrain_json`` and no mirroring axes."""
    if not isinstance(saved, Mapping) or not isinstance(saved.get("network_weights"), Mapping):
        return False
    init_args = saved.get("init_args")
    return "inference_allowed_mirroring_axes" in saved or (isinstance(init_args, Mapping)
                                                          and {"plans", "dataset_json"} <= set(init_args))


def looks_like_nnssl(saved: object, keys: list[str]) -> bool:
    """Whether a file without an adaptation plan may still be an nnssl checkpoint: not an nnU-Net trainer's, with
    the pretraining U-Net's encoder under a second name (``decoder.encoder.*``) or a residual stem
    (``encoder.stem.*``)."""
    return not is_nnunet_checkpoint(saved) and any(k.startswith(("decoder.encoder.", "encoder.stem.")) for k in keys)


def adaptation_plan_of(saved: object, filename: str) -> AdaptationPlan | None:
    """The adaptation plan of a loaded checkpoint: its ``nnssl_adaptation_plan``, else the ``adaptation_plan.json``
    beside ``filename`` when the file holds a state dict that is not an nnU-Net trainer's checkpoint
    (:func:`is_nnunet_checkpoint`: e.g. a fine-tuned fold saved into the checkpoint's folder); None for other files
    (not an nnssl checkpoint)."""
    if isinstance(saved, Mapping) and ADAPTATION_PLAN_KEY in saved:
        return AdaptationPlan.from_dict(saved[ADAPTATION_PLAN_KEY], filename)
    beside = plan_beside(filename)
    if isinstance(saved, Mapping) and not is_nnunet_checkpoint(saved) and os.path.isfile(beside):
        return read_adaptation_plan(beside)
    return None


def read_adaptation_plan(path: str) -> AdaptationPlan:
    """The adaptation plan of an nnssl checkpoint or of an ``adaptation_plan.json``; ValueError naming ``path``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (give an nnssl checkpoint_final.pth or its "
                                f"{ADAPTATION_PLAN_FILE})")
    if path.endswith(".json"):
        try:
            with open(path) as f:
                return AdaptationPlan.from_dict(json.load(f), path)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ValueError(f"{path}: cannot be read by torch.load ({error})") from None
    plan = adaptation_plan_of(saved, path)
    if plan is None and is_nnunet_checkpoint(saved) and os.path.isfile(plan_beside(path)):
        raise ValueError(f"{path}: a checkpoint of nnU-Net's trainer {saved.get('trainer_name')}, not an nnssl "
                         f"checkpoint; the {ADAPTATION_PLAN_FILE} beside it belongs to another file (give the nnssl "
                         f"checkpoint or the {ADAPTATION_PLAN_FILE} itself)")
    if plan is None:
        raise ValueError(f"{path}: not an nnssl checkpoint (no '{ADAPTATION_PLAN_KEY}' in it and no "
                         f"{ADAPTATION_PLAN_FILE} beside it)")
    return plan


def _under(key: str, prefix: str) -> str | None:
    """The rest of ``key`` below the module path ``prefix`` (without the dot), or None when it is not below it."""
    return key[len(prefix) + 1:] if key.startswith(prefix + ".") else None


@dataclass
class EncoderTransfer:
    """Network key -> (file key, value) for the encoder and stem, with the adapted keys and how; ``aliases``: file
    keys that are other names of a mapped file key's tensor (e.g. ``decoder.encoder.*`` of ``encoder.*``) -> that
    key; ``unused``: the file's other keys, and why."""

    values: dict[str, torch.Tensor]
    origin: dict[str, str]
    adapted: dict[str, str]
    unused: dict[str, str]
    aliases: dict[str, str] = field(default_factory=dict)


def map_encoder(plan: AdaptationPlan, weights: Mapping[str, torch.Tensor], network: Mapping[str, torch.Tensor],
                encoder_key: str = "encoder.stages", stem_key: str = "encoder.stem") -> EncoderTransfer:
    """Map the checkpoint's encoder and stem (``plan.key_to_encoder`` / ``key_to_stem``) onto the network's
    (``encoder_key`` / ``stem_key``, the planned network's ``key_to_encoder`` / ``key_to_stem``).

    Every encoder and stem tensor of the network must come from the file with its shape, and every one of the
    file's must have a place; the stem's input convolution (``keys_to_in_proj``) pretrained on one channel is
    repeated over the network's input channels and divided by their number. ValueError otherwise, saying what to
    plan. File keys that name a mapped tensor again (:func:`other_names`) are aliases; ``weights``' other tensors
    (the pretraining decoder, projection heads) are listed as unused.
    """
    plan.network()  # refuses transformers and unknown architectures by name
    prefixes = ((plan.key_to_stem, stem_key), (plan.key_to_encoder, encoder_key))  # the stem may lie in the encoder
    values, origin, unused, problems = {}, {}, {}, []
    for key, value in weights.items():
        target = next((new + "." + rest for old, new in prefixes if (rest := _under(key, old)) is not None), None)
        if target is None:
            unused[key] = ("the pretraining decoder: fine-tuning starts it from scratch" if key.startswith("decoder.")
                           else f"neither encoder ({plan.key_to_encoder}) nor stem ({plan.key_to_stem})")
        elif target not in network:
            problems.append(f"{key} has no place in the plan (no {target})")
        else:
            values[target], origin[target] = value, key
    ours = [k for k in network if _under(k, encoder_key) is not None or _under(k, stem_key) is not None]
    problems += [f"the plan's {k} is not in the checkpoint" for k in ours if k not in values]
    in_proj = {stem_key + "." + rest + ".weight" for k in plan.keys_to_in_proj
               if (rest := _under(k, plan.key_to_stem)) is not None}
    adapted = {}
    for key in list(values):
        have, want = tuple(values[key].shape), tuple(network[key].shape)
        if have == want:
            continue
        if key in in_proj and have[:1] + have[2:] == want[:1] + want[2:]:
            values[key], adapted[key] = _adapt_input_channels(values[key], want[1], plan, origin[key])
        else:
            problems.append(f"{origin[key]}: checkpoint {list(have)}, plan {list(want)}")
    if problems:
        fit = sum(1 for k in ours if k in values and tuple(values[k].shape) == tuple(network[k].shape))
        shown = "; ".join(problems[:3]) + (f"; {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ValueError(f"{plan.source}: the planned network is not the checkpoint's architecture "
                         f"({plan.short_name}): {fit} of {len(ours)} encoder and stem tensors fit ({shown}). Plan "
                         f"the dataset like the checkpoint: `nnunet-ext plan -d DATASET --like-pretrained "
                         f"{plan.source} --preprocess`, then train with `-p nnUNetLikePretrainedPlans` "
                         f"(docs/baselines.md)")
    aliases = other_names(weights, set(origin.values()), unused)
    return EncoderTransfer(values, origin, adapted, {k: why for k, why in unused.items() if k not in aliases},
                           aliases)


def other_names(weights: Mapping[str, torch.Tensor], used: set[str], candidates) -> dict[str, str]:
    """Each of ``candidates`` (keys of ``weights``) that is another name of a tensor of the ``used`` keys -> that
    key: ``decoder.<key>`` of the same tensor (dynamic_network_architectures' U-Nets register the encoder again as
    ``decoder.encoder``; the same storage, as torch.save keeps tensors shared, or equal values in a file whose
    tensors were copied apart), else the first used key with the same storage."""
    by_storage: dict[tuple, str] = {}
    for key in weights:
        if key in used and (place := _storage(weights[key])) is not None:
            by_storage.setdefault(place, key)
    aliases = {}
    for key in candidates:
        value, place = weights[key], _storage(weights[key])
        twin = key[len("decoder."):] if key.startswith("decoder.") else None
        if twin in used and ((place is not None and place == _storage(weights[twin])) or _equal(weights[twin], value)):
            aliases[key] = twin
        elif place is not None and place in by_storage:
            aliases[key] = by_storage[place]
    return aliases


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, type and values (never for tensors without values)."""
    return (not a.is_meta and not b.is_meta and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and torch.equal(a, b))


def _storage(value: torch.Tensor) -> tuple | None:
    """Where a tensor's values lie (storage, offset, shape, strides); None where that cannot tell (meta, empty)."""
    if not isinstance(value, torch.Tensor) or value.is_meta or value.numel() == 0:
        return None
    return (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
            value.stride(), value.dtype)


def _adapt_input_channels(weight: torch.Tensor, channels: int, plan: AdaptationPlan, key: str
                          ) -> tuple[torch.Tensor, str]:
    """The stem's input convolution for ``channels`` input channels, and how it was adapted."""
    pretrained = weight.shape[1]
    if pretrained != plan.pretrain_num_input_channels:
        raise ValueError(f"{plan.source}: {key} has {pretrained} input channels, but the adaptation plan says "
                         f"pretrain_num_input_channels {plan.pretrain_num_input_channels}")
    if pretrained != 1:
        raise ValueError(f"{plan.source}: the stem was pretrained on {pretrained} input channels and the plan has "
                         f"{channels}; only a stem pretrained on one channel can be repeated over the dataset's "
                         f"channels (as nnU-Net master does)")
    repeats = [1] * weight.ndim
    repeats[1] = channels
    return (weight.repeat(*repeats) / channels,
            f"pretrained on 1 input channel, the plan has {channels}: repeated over the {channels} channels and "
            f"divided by {channels}")
