"""GroupNorm is public API: plans name it by dotted path, and plans written with its old path keep working."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import check_predictions, predict, run
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_ext.nn import GroupNorm
from nnunet_ext.planners.groupnorm import GROUP_NORM

OLD_PATH = "nnunet_ext.branches.blocks.GroupNorm"  # what GroupNorm plans named before nnunet_ext.nn existed


def norm_layers(arch: dict, norm_op: str) -> list[torch.nn.Module]:
    """The norm layers of the network nnU-Net builds from ``arch`` with ``norm_op`` as the plans name it."""
    kwargs = dict(arch["arch_kwargs"], norm_op=norm_op)
    net = get_network_from_plans(arch["network_class_name"], kwargs, arch["_kw_requires_import"], 4, 3,
                                 allow_init=False)
    return [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]


def test_plans_name_the_public_path_and_the_old_one_still_resolves():
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 2, "features_per_stage": (8, 16), "conv_op": "torch.nn.modules.conv.Conv3d",
                            "kernel_sizes": ((3, 3, 3), (3, 3, 3)), "strides": ((1, 1, 1), (2, 2, 2)),
                            "n_conv_per_stage": (1, 1), "n_conv_per_stage_decoder": (1,), "conv_bias": True,
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {}},
            "_kw_requires_import": ("conv_op", "norm_op", "dropout_op", "nonlin")}
    assert GROUP_NORM == "nnunet_ext.nn.GroupNorm"
    for path in (GROUP_NORM, OLD_PATH):
        layers = norm_layers(arch, path)
        assert layers and all(type(m) is GroupNorm for m in layers), path


@pytest.mark.slow
def test_plans_with_the_old_path_train_and_predict(tiny_dataset, tmp_path):
    """A plans file written before GroupNorm moved: nnUNetv2_train and nnUNetv2_predict still work with it."""
    ds = dict(tiny_dataset, plans="nnUNetCPUOldGNPlans")
    with open(os.path.join(ds["preprocessed"], "nnUNetCPUPlans.json")) as f:
        plans = json.load(f)
    plans["plans_name"] = ds["plans"]  # same data_identifier: reuses the preprocessed data
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    arch["arch_kwargs"]["norm_op"] = OLD_PATH
    with open(os.path.join(ds["preprocessed"], ds["plans"] + ".json"), "w") as f:
        json.dump(plans, f)
    trainer = "EncDecTrainer_3labels_1epochs_2iters_noMirroring"
    run(["nnUNetv2_train", str(ds["id"]), "3d_fullres", "0", "-p", ds["plans"], "-tr", trainer, "-device", "cpu"],
        ds["env"])
    predict(ds, trainer, [0], str(tmp_path / "pred"))
    check_predictions(ds, str(tmp_path / "pred"))
    checkpoint = torch.load(os.path.join(ds["results"], f"{trainer}__{ds['plans']}__3d_fullres", "fold_0",
                                         "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    configuration = PlansManager(plans).get_configuration("3d_fullres")
    net = get_network_from_plans(configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                                 configuration.network_arch_init_kwargs_req_import, 4, 3, allow_init=False)
    net.load_state_dict(checkpoint["network_weights"], strict=True)
    assert any(type(m) is GroupNorm for m in net.modules())  # it trained a GroupNorm network


def plans_with(norms: dict[str, str | None]) -> dict:
    """Plans whose configurations name the given norm_op (None: no norm), plus one inheriting configuration."""
    configurations = {name: {"architecture": {"arch_kwargs": {"norm_op": norm}}} for name, norm in norms.items()}
    configurations["3d_cascade_fullres"] = {"inherits_from": "3d_fullres"}
    return {"plans_name": "P", "configurations": configurations}


def test_cpc_trainers_get_the_group_norm_copy_of_instance_and_batch_norm_plans():
    from nnunet_ext.planners.groupnorm import group_norm_plans, norm_op_of

    plans = plans_with({"3d_fullres": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "2d": "torch.nn.modules.batchnorm.BatchNorm2d", "3d_lowres": None,
                        "3d_gn": OLD_PATH})
    copy, replaced = group_norm_plans(plans)
    assert replaced == {"3d_fullres": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "2d": "torch.nn.modules.batchnorm.BatchNorm2d"}
    assert [norm_op_of(copy, c) for c in ("3d_fullres", "2d", "3d_lowres", "3d_gn", "3d_cascade_fullres")] == \
        [GROUP_NORM, GROUP_NORM, None, OLD_PATH, GROUP_NORM]
    assert norm_op_of(plans, "3d_fullres").endswith("InstanceNorm3d")  # the given plans are not changed


@pytest.mark.parametrize("norm, message", [("torch.nn.LayerNorm", "neither a GroupNorm nor an instance or batch"),
                                           ("no.such.Norm", "not an importable class")])
def test_an_unknown_norm_is_refused_by_name(norm, message):
    from nnunet_ext.planners.groupnorm import group_norm_plans

    with pytest.raises(ValueError, match=rf"'{norm}'.*{message}"):
        group_norm_plans(plans_with({"3d_fullres": norm}))
