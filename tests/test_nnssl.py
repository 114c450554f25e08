"""nnssl (OpenMind) checkpoints with our trainers: checkpoints built in nnssl's exact format (a ResEncL-shaped network
with tiny features, a real-format adaptation plan), loaded into 4-channel networks (stem repeated and divided, values
checked), recorded key by key, refused by name when they cannot be mapped; plans like the checkpoint; and the real
``nnunet-ext plan --like-pretrained`` + ``nnUNetv2_train -pretrained_weights`` of EncDec, CPCSeg and MeanTeacher."""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import shutil

import pytest
import test_study
import torch
from conftest import run
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

from nnunet_ext import nnssl
from nnunet_ext.files import file_sha256
from nnunet_ext.planners.groupnorm import GROUP_NORM
from nnunet_ext.planners.like_pretrained import like_pretrained_plans
from nnunet_ext.pretrained import (
    RECORD_FILE,
    load_pretrained,
    planned_network,
    write_record,
    write_twin_plans,
)

# nnssl's DynamicArchitecturePlans.serialize() of a ResEncL-shaped network (residual stem and stages, 3x3x3 kernels,
# isotropic strides, more blocks deeper) with tiny features; classes as nnssl writes them (module + name)
TINY_RESENC = {
    "n_stages": 4, "features_per_stage": [4, 8, 16, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 4, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
    "n_blocks_per_stage": [1, 1, 2, 2], "n_conv_per_stage_decoder": [1, 1, 1], "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.modules.activation.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}
# nnssl's architecture_registry.get_res_enc_l (commit 7044864), written out here as the reference
NNSSL_RESENC_L = dict(n_stages=6, features_per_stage=[32, 64, 128, 256, 320, 320], conv_op=torch.nn.Conv3d,
                      kernel_sizes=[[3, 3, 3]] * 6, strides=[[1, 1, 1]] + [[2, 2, 2]] * 5,
                      n_blocks_per_stage=[1, 3, 4, 6, 6, 6], n_conv_per_stage_decoder=[1, 1, 1, 1, 1], conv_bias=True,
                      norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                      nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True})
STEM = "encoder.stem.convs.0.conv.weight"
STEM_ALIAS = "encoder.stem.convs.0.all_modules.0.weight"


def adaptation_plan(architecture: str = "ResidualEncoderUNet", arch_kwargs: dict | None = TINY_RESENC,
                    channels: int = 1, patch=(32, 32, 64), **keys) -> dict:
    """An adaptation plan as nnssl's AdaptationPlan.serialize() writes it (the JSON of adaptation_plan.json)."""
    configuration = {
        "data_identifier": "nnsslPlans_onemmiso", "preprocessor_name": "DefaultPreprocessor",
        "spacing_style": "onemmiso", "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": False,
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_mask": "resample_data_or_seg_to_shape",
        "resampling_fn_mask_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "spacing": [1, 1, 1], "patch_size": [160, 160, 160]}
    plan = {
        "architecture_plans": {"arch_class_name": architecture, "arch_kwargs": arch_kwargs,
                               "arch_kwargs_requiring_import": ["conv_op", "norm_op", "nonlin"] if arch_kwargs
                               else None},
        "pretrain_plan": {"dataset_name": "Dataset745_OpenMind", "plans_name": "nnsslPlans",
                          "original_median_spacing_after_transp": [1, 1, 1],
                          "image_reader_writer": "NibabelReaderWriter", "transpose_forward": [0, 1, 2],
                          "transpose_backward": [0, 1, 2], "configurations": {"onemmiso": configuration},
                          "experiment_planner_used": "ExperimentPlanner"},
        "pretrain_num_input_channels": channels, "recommended_downstream_patchsize": list(patch),
        "key_to_encoder": "encoder.stages", "key_to_stem": "encoder.stem",
        "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"], "key_to_lpe": None}
    plan.update(keys)
    return plan


def resenc(kwargs: dict = TINY_RESENC, channels: int = 1, outputs: int = 1, seed: int = 0,
           deep_supervision: bool = False) -> ResidualEncoderUNet:
    """A ResidualEncoderUNet from nnssl-serialized kwargs, its weights perturbed (seeded) away from any
    initialisation."""
    torch.manual_seed(seed)
    network = get_network_from_plans(nnssl.RESIDUAL_ENCODER_UNET, copy.deepcopy(kwargs),
                                     ["conv_op", "norm_op", "dropout_op", "nonlin"], channels, outputs,
                                     allow_init=True, deep_supervision=deep_supervision)
    with torch.no_grad():
        for p in network.parameters():  # each tensor once: names of one tensor stay one tensor
            p.add_(torch.randn_like(p))
    return network


def save_nnssl_checkpoint(path, network: torch.nn.Module, plan: dict) -> str:
    """A checkpoint as nnssl's AbstractBaseTrainer.save_checkpoint writes it (MAE pretraining, 1 output channel)."""
    torch.save({"network_weights": network.state_dict(), "optimizer_state": {"state": {}, "param_groups": []},
                "grad_scaler_state": None, "logging": {"train_losses": [0.5]}, "_best_ema": None,
                "current_epoch": 1000, "init_args": {"fold": "all", "configuration": "onemmiso"},
                "trainer_name": "BaseMAETrainer5d", "nnssl_adaptation_plan": plan}, path)
    return str(path)


def test_nnssl_checkpoint_loads_encoder_and_stem_into_four_channels_and_records_every_key(tmp_path):
    source = resenc(channels=1)
    checkpoint = save_nnssl_checkpoint(tmp_path / "checkpoint_final.pth", source, adaptation_plan())
    target = resenc(channels=4, outputs=3, seed=1, deep_supervision=True)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    messages = []
    load_pretrained(target, checkpoint, messages.append, str(tmp_path / "fold_0"))
    pretrained, loaded = source.state_dict(), target.state_dict()

    expected_stem = pretrained[STEM].repeat(1, 4, 1, 1, 1) / 4
    assert loaded[STEM].shape == (4, 4, 3, 3, 3) and torch.equal(loaded[STEM], expected_stem)
    assert torch.equal(loaded[STEM_ALIAS], expected_stem)
    assert torch.equal(loaded[STEM].sum(1, keepdim=True), pretrained[STEM])  # the stem's response to equal channels
    for key, value in loaded.items():
        if key.startswith(("encoder.", "decoder.encoder.")) and "stem.convs.0.conv" not in key \
                and "stem.convs.0.all_modules.0.weight" not in key:
            assert torch.equal(value, pretrained[key.removeprefix("decoder.")]), key
        elif key.startswith("decoder.") and not key.startswith("decoder.encoder."):
            assert torch.equal(value, before[key]), f"{key} changed: the decoder starts as initialised"

    with open(tmp_path / "fold_0" / RECORD_FILE) as f:
        record = json.load(f)
    assert set(record["network"]) == set(loaded) and set(record["file"]) == set(pretrained)
    network, file = record["network"], record["file"]
    assert network[STEM]["status"] == "adapted" and "divided by 4" in network[STEM]["how"]
    assert network["encoder.stem.convs.0.conv.bias"] == {"status": "loaded", "from": "encoder.stem.convs.0.conv.bias"}
    assert network["decoder.encoder.stages.0.blocks.0.conv1.conv.weight"]["loaded_with"] == \
        "encoder.stages.0.blocks.0.conv1.conv.weight"
    assert all(e["status"] == "skipped" for k, e in network.items() if ".seg_layers." in k)
    assert all(e["status"] == "not loaded" for k, e in network.items()
               if k.startswith("decoder.") and not k.startswith("decoder.encoder.") and ".seg_layers." not in k)
    assert all(e["status"] == "unused" and "from scratch" in e["why"] for k, e in file.items()
               if k.startswith("decoder.") and not k.startswith("decoder.encoder."))
    # the pretraining network's encoder under its second name: the tensors loaded through encoder.*
    encoder_names = [k for k in file if k.startswith("decoder.encoder.")]
    assert len(encoder_names) == sum(k.startswith("encoder.") for k in file)
    for key in encoder_names:
        alias = key.removeprefix("decoder.")
        assert file[key] == {"status": "used", "same_tensor_as": alias, "into": file[alias]["into"]}, key
    assert file["decoder." + STEM]["into"] == [STEM]
    assert file[STEM] == {"status": "used", "into": [STEM]}
    assert record["nnssl"]["architecture"] == "ResidualEncoderUNet" and len(record["sha256"]) == 64
    assert record["summary"]["segmentation layers"]["loaded"] == 0
    assert record["summary"]["encoder"]["loaded"] == record["summary"]["encoder"]["tensors"]
    log = "\n".join(messages)
    assert "nnssl checkpoint of ResidualEncoderUNet pretrained on 1 input channel(s)" in log
    assert f"adapted {STEM}: pretrained on 1 input channel, the plan has 4" in log
    assert "not loaded (start as initialised)" in log and "in the file but not used" in log
    unused_line = next(m for m in messages if "in the file but not used" in m)
    assert "decoder.encoder." not in unused_line and "decoder.stages." in unused_line
    assert f"used as other names of used tensors: {len(encoder_names)} keys of the file" in log


def test_encoder_names_copied_apart_are_recognised_by_their_values(tmp_path):
    weights = {k: v.clone() for k, v in resenc().state_dict().items()}  # no tensor shared any more
    changed = "decoder.encoder.stages.1.blocks.0.conv1.conv.weight"
    weights[changed] = weights[changed] + 1
    torch.save({"network_weights": weights, nnssl.ADAPTATION_PLAN_KEY: adaptation_plan()}, tmp_path / "c.pth")
    file = load_pretrained(resenc(channels=4), str(tmp_path / "c.pth"), lambda _: None)["file"]
    assert file["decoder.encoder.stages.0.blocks.0.conv1.conv.weight"]["same_tensor_as"] == \
        "encoder.stages.0.blocks.0.conv1.conv.weight"
    assert file[changed]["status"] == "unused"  # other values: not the encoder's tensor


def test_record_is_written_atomically_and_an_earlier_one_is_kept(tmp_path):
    messages = []
    path = write_record(str(tmp_path), {"a": 1}, messages.append)
    assert write_record(str(tmp_path), {"a": 1}, messages.append) == path  # same content: nothing to keep
    assert sorted(os.listdir(tmp_path)) == [RECORD_FILE]
    write_record(str(tmp_path), {"a": 2}, messages.append)
    assert set(os.listdir(tmp_path)) == {RECORD_FILE, "pretrained_weights.1.json"}
    assert json.loads((tmp_path / "pretrained_weights.1.json").read_text()) == {"a": 1}
    assert json.loads((tmp_path / RECORD_FILE).read_text()) == {"a": 2}
    assert any("kept as" in m and "pretrained_weights.1.json" in m for m in messages)
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask  # as open() gives, not mkstemp's 0600


def test_transformers_and_unknown_architectures_are_refused_by_name(tmp_path):
    primus = adaptation_plan("PrimusM", None, key_to_encoder="eva", key_to_stem="down_projection",
                             keys_to_in_proj=["down_projection.proj"], key_to_lpe="eva.pos_embed")
    checkpoint = save_nnssl_checkpoint(tmp_path / "primus.pth", resenc(), primus)
    with pytest.raises(ValueError, match="PrimusM, a Primus transformer .* cannot be mapped onto a CNN plan"):
        load_pretrained(resenc(channels=4), checkpoint)
    with pytest.raises(ValueError, match="unknown nnssl architecture 'SwinUNETR'"):
        nnssl.AdaptationPlan.from_dict(adaptation_plan("SwinUNETR", None), "x.json").network()
    with pytest.raises(ValueError, match="lacks key_to_encoder"):
        nnssl.AdaptationPlan.from_dict({k: v for k, v in adaptation_plan().items() if k != "key_to_encoder"}, "x")


def test_another_architecture_is_refused_saying_what_to_plan(tmp_path):
    checkpoint = save_nnssl_checkpoint(tmp_path / "checkpoint_final.pth", resenc(), adaptation_plan())
    wider = dict(TINY_RESENC, features_per_stage=[8, 16, 32, 32])
    deeper = dict(TINY_RESENC, n_stages=5, features_per_stage=[4, 8, 16, 16, 16], kernel_sizes=[[3, 3, 3]] * 5,
                  strides=TINY_RESENC["strides"] + [[2, 2, 2]], n_blocks_per_stage=[1, 1, 2, 2, 2],
                  n_conv_per_stage_decoder=[1, 1, 1, 1])
    for kwargs, problem in ((wider, "checkpoint \\[4, 1, 3, 3, 3\\], plan \\[8, 4, 3, 3, 3\\]"),
                            (deeper, "the plan's encoder.stages.4.* is not in the checkpoint")):
        target = resenc(kwargs, channels=4, outputs=3)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(ValueError, match=f"not the checkpoint's architecture.*{problem}.*nnunet-ext plan -d "
                                             f"DATASET --like-pretrained {checkpoint}"):
            load_pretrained(target, checkpoint)
        assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # refused: nothing loaded


def test_only_a_one_channel_stem_is_repeated(tmp_path):
    checkpoint = save_nnssl_checkpoint(tmp_path / "c.pth", resenc(channels=2), adaptation_plan(channels=2))
    with pytest.raises(ValueError, match="pretrained on 2 input channels and the plan has 4; only a stem pretrained "
                                         "on one channel"):
        load_pretrained(resenc(channels=4), checkpoint)
    same = resenc(channels=2, seed=3)
    load_pretrained(same, checkpoint)  # as many channels as pretrained: loaded as they are
    assert torch.equal(same.state_dict()[STEM], resenc(channels=2).state_dict()[STEM])


def test_a_plainconvunet_checkpoint_in_nnssls_format_plans_and_loads(tmp_path):
    # nnssl's DynamicArchitecturePlans writes n_blocks_per_stage for every network; PlainConvUNet takes n_conv_per_stage
    plain = {k: v for k, v in TINY_RESENC.items() if k != "n_blocks_per_stage"}
    plain["n_conv_per_stage"] = TINY_RESENC["n_blocks_per_stage"]
    torch.manual_seed(0)
    source = get_network_from_plans(nnssl.PLAIN_CONV_UNET, plain, nnssl.KW_REQUIRES_IMPORT, 1, 1, allow_init=True,
                                    deep_supervision=False)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    first = "encoder.stages.0.0.convs.0"  # PlainConvUNet's stem is its first stage
    plan = adaptation_plan("PlainConvUNet", TINY_RESENC, key_to_stem="encoder.stages.0",
                           keys_to_in_proj=[f"{first}.conv", f"{first}.all_modules.0"])
    checkpoint = save_nnssl_checkpoint(tmp_path / "checkpoint_final.pth", source, plan)
    plans = like_pretrained_plans(base_plans(), nnssl.read_adaptation_plan(checkpoint))
    architecture = plans["configurations"]["3d_fullres"]["architecture"]
    assert architecture["network_class_name"] == nnssl.PLAIN_CONV_UNET
    assert architecture["arch_kwargs"]["n_conv_per_stage"] == [1, 1, 2, 2]
    assert "n_blocks_per_stage" not in architecture["arch_kwargs"]
    target = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                    architecture["_kw_requires_import"], 4, 3, allow_init=True, deep_supervision=True)
    record = load_pretrained(target, checkpoint, lambda _: None)
    loaded, pretrained = target.state_dict(), source.state_dict()
    assert record["network"][f"{first}.conv.weight"]["status"] == "adapted"
    assert torch.equal(loaded[f"{first}.conv.weight"], pretrained[f"{first}.conv.weight"].repeat(1, 4, 1, 1, 1) / 4)
    assert all(torch.equal(loaded[k], v) for k, v in pretrained.items()
               if k.startswith("encoder.") and k not in (f"{first}.conv.weight", f"{first}.all_modules.0.weight"))
    assert record["summary"]["encoder"]["loaded"] == record["summary"]["encoder"]["tensors"]
    wrong = adaptation_plan("PlainConvUNet", dict(TINY_RESENC, stem_channels=8))
    with pytest.raises(ValueError, match="arch_kwargs do not build PlainConvUNet: PlainConvUNet takes no "
                                         "stem_channels"):
        nnssl.AdaptationPlan.from_dict(wrong, "adaptation_plan.json").network()


def test_an_nnunet_checkpoint_beside_an_adaptation_plan_stays_an_nnunet_checkpoint(tmp_path):
    source = resenc(channels=4, outputs=3, deep_supervision=True)
    torch.save({"network_weights": source.state_dict(), "trainer_name": "EncDecTrainer",
                "init_args": {"plans": {}, "configuration": "3d_fullres", "fold": 0, "dataset_json": {},
                              "device": "cpu"}, "inference_allowed_mirroring_axes": (0, 1, 2)},
               tmp_path / "checkpoint_best.pth")  # a fine-tuned fold saved into the nnssl checkpoint's folder
    (tmp_path / nnssl.ADAPTATION_PLAN_FILE).write_text(json.dumps(adaptation_plan()))
    target, messages = resenc(channels=4, outputs=3, seed=1, deep_supervision=True), []
    record = load_pretrained(target, str(tmp_path / "checkpoint_best.pth"), messages.append)
    assert record["format"] == "nnU-Net checkpoint or state dict" and "nnssl" not in record
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items()
               if ".seg_layers." not in k)
    assert any(f"{tmp_path / nnssl.ADAPTATION_PLAN_FILE} is not used" in m and "nnU-Net's trainer EncDecTrainer" in m
               for m in messages)
    with pytest.raises(ValueError, match="a checkpoint of nnU-Net's trainer EncDecTrainer, not an nnssl checkpoint"):
        nnssl.read_adaptation_plan(str(tmp_path / "checkpoint_best.pth"))


def test_an_nnssl_checkpoint_without_its_adaptation_plan_warns_that_the_stem_was_not_loaded(tmp_path):
    torch.save({"network_weights": resenc().state_dict(), "trainer_name": "BaseMAETrainer"}, tmp_path / "w.pth")
    messages = []
    record = load_pretrained(resenc(channels=4), str(tmp_path / "w.pth"), messages.append)
    assert record["format"] == "nnU-Net checkpoint or state dict"
    assert record["network"][STEM] == {"status": "not loaded", "why": "shape differs"}
    warning = messages[1]  # right after the summary line
    assert "WARNING: the stem was NOT loaded" in warning and "its adaptation plan is missing" in warning
    assert f"{STEM}: file [4, 1, 3, 3, 3], network [4, 4, 3, 3, 3]" in warning
    assert record["notes"] == [warning.removeprefix("[nnunet-ext] ")]
    torch.save({"network_weights": resenc(channels=4).state_dict()}, tmp_path / "same.pth")
    messages.clear()
    load_pretrained(resenc(channels=4), str(tmp_path / "same.pth"), messages.append)  # the stem fits: no warning
    assert not any("WARNING" in m for m in messages)


def test_adaptation_plan_json_beside_a_bare_state_dict_is_found(tmp_path):
    source = resenc()
    torch.save({"network_weights": source.state_dict()}, tmp_path / "weights.pth")
    (tmp_path / nnssl.ADAPTATION_PLAN_FILE).write_text(json.dumps(adaptation_plan()))
    target = resenc(channels=4)
    record = load_pretrained(target, str(tmp_path / "weights.pth"))
    assert record["format"] == "nnssl checkpoint" and record["network"][STEM]["status"] == "adapted"
    assert record["nnssl"]["adaptation_plan"] == str(tmp_path / nnssl.ADAPTATION_PLAN_FILE)


def base_plans(channels: int = 4) -> dict:
    """The parts of an nnU-Net plans file that like-pretrained planning reads (a 3d_fullres CPU plan)."""
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {}, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    configuration = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
                     "batch_size": 7, "patch_size": [64, 64, 64], "median_image_size_in_voxels": [140, 170, 140],
                     "spacing": [1.0, 0.5, 0.5], "normalization_schemes": ["ZScoreNormalization"] * channels,
                     "use_mask_for_norm": [True] * channels, "architecture": arch, "batch_dice": True}
    return {"dataset_name": "Dataset001_BrainTumour", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
            "configurations": {"2d": dict(configuration), "3d_fullres": configuration}}


def test_plans_like_a_resencl_checkpoint_build_its_encoder():
    plan = nnssl.AdaptationPlan.from_dict(adaptation_plan("ResEncL", None, patch=(160, 160, 160)), "ckpt.pth")
    plans = like_pretrained_plans(base_plans(), plan)
    configuration = plans["configurations"]["3d_fullres"]
    assert list(plans["configurations"]) == ["3d_fullres"] and plans["plans_name"] == "nnUNetLikePretrainedPlans"
    assert configuration["spacing"] == [1.0, 1.0, 1.0] and configuration["patch_size"] == [160, 160, 160]
    assert configuration["normalization_schemes"] == ["ZScoreNormalization"] * 4 and configuration["batch_size"] == 2
    assert configuration["median_image_size_in_voxels"] == [140, 85, 70]
    assert configuration["data_identifier"] == "nnUNetLikePretrainedPlans_3d_fullres"
    assert configuration["architecture"]["network_class_name"] == nnssl.RESIDUAL_ENCODER_UNET
    ours = planned_network(plans, "3d_fullres", 4).state_dict()
    with torch.device("meta"):
        reference = ResidualEncoderUNet(input_channels=4, num_classes=2, **NNSSL_RESENC_L).state_dict()
    encoder = {k: tuple(v.shape) for k, v in reference.items() if k.startswith("encoder.")}
    assert {k: tuple(v.shape) for k, v in ours.items() if k.startswith("encoder.")} == encoder
    grouped = like_pretrained_plans(base_plans(), plan, "P", group_norm=True, patch_size=[128, 128, 96])
    assert grouped["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["norm_op"] == GROUP_NORM
    assert grouped["configurations"]["3d_fullres"]["patch_size"] == [128, 128, 96]
    with pytest.raises(ValueError, match=r"--patch-size \[100, 128, 128\] is not a multiple of the network's total "
                                         r"stride \[32, 32, 32\]"):
        like_pretrained_plans(base_plans(), plan, patch_size=[100, 128, 128])
    without_3d = base_plans()
    del without_3d["configurations"]["3d_fullres"]
    with pytest.raises(ValueError, match="no 3d_fullres configuration"):
        like_pretrained_plans(without_3d, plan)


def test_plan_like_pretrained_stores_absolute_paths_and_keeps_other_plans(tmp_path, monkeypatch, capsys):
    import argparse

    import nnunetv2.paths

    from nnunet_ext.commands import plan as plan_command

    folder = tmp_path / "preprocessed" / "Dataset001_BrainTumour"
    folder.mkdir(parents=True)
    (folder / "nnUNetPlans.json").write_text(json.dumps(base_plans()))
    monkeypatch.setattr(nnunetv2.paths, "nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    (tmp_path / "openmind").mkdir()
    checkpoint = save_nnssl_checkpoint(tmp_path / "openmind" / "checkpoint_final.pth", resenc(), adaptation_plan())
    monkeypatch.chdir(tmp_path / "openmind")

    def plan(*args, **kwargs) -> str:
        return plan_command.plan_like_pretrained("Dataset001_BrainTumour", "nnUNetPlans", *args, **kwargs)

    assert plan("checkpoint_final.pth") == LIKE  # as typed: relative
    written = (folder / f"{LIKE}.json").read_text()
    assert json.loads(written)["nnunet_ext_like_pretrained"]["adaptation_plan"] == checkpoint
    assert plan(checkpoint) == LIKE  # the same plans again: nothing to refuse
    with pytest.raises(FileExistsError, match=f"{LIKE}.json exists \\(planned like {re.escape(checkpoint)}\\) and "
                                              f"differs .*differing: configurations.3d_fullres.patch_size.*"
                                              f"-overwrite_plans_name OTHER_NAME .*--overwrite-like-pretrained"):
        plan(checkpoint, patch_size=[32, 32, 32])
    assert (folder / f"{LIKE}.json").read_text() == written
    assert plan(checkpoint, "OtherPlans", patch_size=[32, 32, 32]) == "OtherPlans"
    assert plan(checkpoint, patch_size=[32, 32, 32], overwrite=True) == LIKE
    assert json.loads((folder / f"{LIKE}.json").read_text())["configurations"]["3d_fullres"]["patch_size"] == [32] * 3
    assert "--overwrite-like-pretrained: replacing" in capsys.readouterr().out
    assert sorted(os.listdir(folder)) == sorted(["nnUNetPlans.json", f"{LIKE}.json", "OtherPlans.json"])
    parser = argparse.ArgumentParser()
    plan_command.add_arguments(parser)
    with pytest.raises(ValueError, match="--overwrite-like-pretrained go with --like-pretrained"):
        plan_command.run(parser.parse_args(["-d", "1", "--overwrite-like-pretrained"]))


def test_twin_plans_follow_a_moved_checkpoint_and_refuse_changed_plans(tmp_path, capsys):
    plans_file = tmp_path / "nnUNetLikePretrainedPlans.json"
    plans_file.write_text(json.dumps(base_plans()))
    checkpoint = save_nnssl_checkpoint(tmp_path / "checkpoint_final.pth", resenc(), adaptation_plan())
    name = write_twin_plans(str(plans_file), checkpoint)
    twin = tmp_path / f"{name}.json"
    assert write_twin_plans(str(plans_file), checkpoint) == name
    moved = shutil.copy(checkpoint, tmp_path / "moved.pth")  # the same bytes elsewhere: the twin follows
    assert write_twin_plans(str(plans_file), str(moved)) == name
    assert json.loads(twin.read_text())["nnunet_ext_pretrained"]["checkpoint"] == str(moved)
    assert "same sha256" in capsys.readouterr().out
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(twin).st_mode & 0o777 == 0o666 & ~mask
    changed = base_plans()
    changed["configurations"]["3d_fullres"]["patch_size"] = [32, 32, 32]
    plans_file.write_text(json.dumps(changed))
    before = twin.read_text()
    with pytest.raises(FileExistsError, match=f"differing: configurations.3d_fullres.patch_size\\); folds trained "
                                              f"under {name} used the old ones and would count as trained"):
        write_twin_plans(str(plans_file), str(moved))
    assert twin.read_text() == before


# -- the real commands on the tiny dataset -----------------------------------------------------------------------
TRAINERS = ("EncDecTrainer", "CPCSegTrainer", "MeanTeacherTrainer")
SCHEDULE = "_3labels_1epochs_1iters_noMirroring"
LIKE = "nnUNetLikePretrainedPlans"


@pytest.fixture(scope="module")
def openmind_like(tiny_dataset, tmp_path_factory):
    """A 1-channel nnssl checkpoint of the tiny ResEncL (patch 32x32x64 recommended: CPC's 64-voxel prediction axis),
    and the 4-channel tiny dataset planned like it (``nnunet-ext plan --like-pretrained --preprocess``) with its
    unlabeled images preprocessed for those plans."""
    folder = tmp_path_factory.mktemp("openmind")
    network = resenc()
    checkpoint = save_nnssl_checkpoint(folder / "checkpoint_final.pth", network, adaptation_plan())
    ds = tiny_dataset
    planned = run(["nnunet-ext", "plan", "-d", str(ds["id"]), "-np", "1", "--like-pretrained", checkpoint,
                   "--preprocess"], ds["env"])
    run(["nnunet-ext", "preprocess-unlabeled", "-d", str(ds["id"]), "-p", LIKE], ds["env"])
    return {"checkpoint": checkpoint, "weights": network.state_dict(), "plan_output": planned.stdout}


@pytest.mark.slow
def test_a_plan_like_the_checkpoint_fine_tunes_encdec_cpcseg_and_meanteacher(tiny_dataset, openmind_like):
    ds, checkpoint, pretrained = tiny_dataset, openmind_like["checkpoint"], openmind_like["weights"]
    encoder = [k for k in pretrained if k.startswith("encoder.")]
    assert f"all {len(encoder)} encoder and stem tensors of {checkpoint} fit; adapted: pretrained on 1 input " \
           f"channel, the plan has 4" in openmind_like["plan_output"]
    with open(os.path.join(ds["preprocessed"], f"{LIKE}.json")) as f:
        plans = json.load(f)
    configuration = plans["configurations"]["3d_fullres"]
    assert configuration["patch_size"] == [32, 32, 64] and configuration["architecture"]["arch_kwargs"][
        "features_per_stage"] == TINY_RESENC["features_per_stage"]
    adapted_stem = pretrained[STEM].repeat(1, 4, 1, 1, 1) / 4
    for base in TRAINERS:
        trainer = base + SCHEDULE
        proc = run(["nnUNetv2_train", str(ds["id"]), "3d_fullres", "0", "-p", LIKE, "-tr", trainer, "-device", "cpu",
                    "-pretrained_weights", checkpoint], ds["env"])
        assert "nnssl checkpoint of ResidualEncoderUNet pretrained on 1 input channel(s)" in proc.stdout
        assert f"adapted {STEM}: pretrained on 1 input channel, the plan has 4" in proc.stdout
        fold = os.path.join(ds["results"], f"{trainer}__{LIKE}__3d_fullres", "fold_0")
        with open(os.path.join(fold, RECORD_FILE)) as f:
            record = json.load(f)
        final = torch.load(os.path.join(fold, "checkpoint_final.pth"), weights_only=False)
        assert set(record["network"]) == set(final["network_weights"]) and set(record["file"]) == set(pretrained)
        assert all(record["network"][k]["status"] in ("loaded", "adapted") for k in encoder), trainer
        assert record["sha256"] and record["source"] == checkpoint
        # one optimizer step from the pretrained encoder (SGD, lr 0.01), far from any fresh initialisation
        networks = [final["network_weights"]] + ([final["teacher_weights"]] if "teacher_weights" in final else [])
        for weights in networks:
            for key in encoder:
                start = adapted_stem if key in (STEM, STEM_ALIAS) else pretrained[key]
                assert (weights[key] - start).norm() <= 0.05 * start.norm() + 1e-3, f"{trainer}: {key}"


@pytest.mark.slow
def test_a_plan_of_another_architecture_is_refused_through_nnunets_call(make_trainer, tmp_path):
    import nnunetv2.run.run_training as run_training

    checkpoint = save_nnssl_checkpoint(tmp_path / "checkpoint_final.pth", resenc(), adaptation_plan())
    trainer = make_trainer("EncDecTrainer" + SCHEDULE)  # on the tiny dataset's CPU plans (a PlainConvUNet)
    trainer.initialize()
    with pytest.raises(ValueError, match=f"not the checkpoint's architecture \\(ResidualEncoderUNet\\): 0 of .* "
                                         f"--like-pretrained {checkpoint} --preprocess"):
        run_training.load_pretrained_weights(trainer.network, checkpoint, verbose=True)
    assert not os.path.exists(os.path.join(trainer.output_folder, RECORD_FILE))


# -- nnunet-ext study --pretrained (nnU-Net stubbed: test_study's fake_nnunet) -----------------------------------
fake_nnunet = test_study.fake_nnunet
results_of, study, trainings = test_study.results_of, test_study.study, test_study.trainings


def write_like_plans(preprocessed, kwargs: dict = TINY_RESENC, source: str = "checkpoint_final.pth") -> None:
    """Plans like the tiny checkpoint for the fake study dataset (1 channel), as ``nnunet-ext plan`` writes them."""
    plan = nnssl.AdaptationPlan.from_dict(adaptation_plan(arch_kwargs=kwargs), source)
    (preprocessed / f"{LIKE}.json").write_text(json.dumps(like_pretrained_plans(base_plans(channels=1), plan)))


def test_study_pairs_every_cell_with_its_pretrained_twin(fake_nnunet, tmp_path, capsys):
    write_like_plans(fake_nnunet.preprocessed)
    checkpoint = save_nnssl_checkpoint(tmp_path / "checkpoint_final.pth", resenc(), adaptation_plan())
    twin = f"{LIKE}__pretrained_{file_sha256(checkpoint)[:8]}"
    grid = ("--trainers", "EncDec", "MeanTeacher", "--labels", "3", "--folds", "0", "-p", LIKE,
            "--pretrained", checkpoint)
    assert study(*grid, "--dispatch", "print") == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("nnUNetv2_train")]
    assert printed[2].endswith(f"-p {twin} -tr EncDecTrainer_3labels -device cuda -pretrained_weights {checkpoint}")
    assert printed[0].endswith(f"-p {LIKE} -tr EncDecTrainer_3labels -device cuda --c")
    with open(fake_nnunet.preprocessed / f"{twin}.json") as f:
        twin_plans = json.load(f)
    like = json.loads((fake_nnunet.preprocessed / f"{LIKE}.json").read_text())
    assert twin_plans["nnunet_ext_pretrained"]["sha256"] == file_sha256(checkpoint)
    assert {k: v for k, v in twin_plans.items() if k not in ("plans_name", "nnunet_ext_pretrained")} == \
        {k: v for k, v in like.items() if k != "plans_name"}  # same network and data identifier

    assert study(*grid) == 0
    commands = [c for c in fake_nnunet.calls if c[0] == "nnUNetv2_train"]
    assert trainings(fake_nnunet.calls) == [("EncDecTrainer_3labels", "0"), ("MeanTeacherTrainer_3labels", "0")] * 2
    assert all("-pretrained_weights" not in c and "--c" in c for c in commands[:2])
    assert all(c[c.index("-pretrained_weights") + 1] == checkpoint and "--c" not in c and twin in c
               for c in commands[2:])
    table, rows = results_of(fake_nnunet.output)
    assert {(r["model"], r["plans"]) for r in rows} == {("EncDec", LIKE), ("MeanTeacher", LIKE),
                                                         ("EncDec+pretrained", twin), ("MeanTeacher+pretrained", twin)}
    assert "| EncDec+pretrained | 3 |" in table
    with open(fake_nnunet.output / "paired_differences.csv", newline="") as f:  # each against EncDec, paired
        assert {r["model"] for r in csv.DictReader(f)} == {"MeanTeacher", "EncDec+pretrained", "MeanTeacher+pretrained"}
    for name in ("EncDecTrainer_3labels", "EncDecTrainer_3labels+pretrained"):
        assert (fake_nnunet.output / "predictions" / name / "folds_0" / "summary_brats.json").is_file()
    status = json.loads((fake_nnunet.output / "study_status.json").read_text())
    assert status["EncDecTrainer_3labels+pretrained"]["model"] == "EncDec+pretrained"

    # a pretrained fold interrupted after its first checkpoint resumes it (nnU-Net refuses --c with weights)
    fold = fake_nnunet.results / f"MeanTeacherTrainer_6labels__{twin}__3d_fullres" / "fold_0"
    fold.mkdir(parents=True)
    (fold / "checkpoint_latest.pth").write_bytes(b"")
    assert study(*grid[:4], "6", *grid[5:], "--dispatch", "print") == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("nnUNetv2_train")]
    assert printed[-1].endswith(f"-p {twin} -tr MeanTeacherTrainer_6labels -device cuda --c")


def test_study_refuses_a_checkpoint_that_does_not_fit_before_anything_trains(fake_nnunet, tmp_path, capsys,
                                                                             monkeypatch):
    write_like_plans(fake_nnunet.preprocessed, dict(TINY_RESENC, features_per_stage=[8, 16, 32, 32]))
    checkpoint = save_nnssl_checkpoint(tmp_path / "checkpoint_final.pth", resenc(), adaptation_plan())
    assert study("--trainers", "EncDec", "--labels", "3", "-p", LIKE, "--pretrained", checkpoint) == 2
    assert "not the checkpoint's architecture" in capsys.readouterr().err and fake_nnunet.calls == []
    assert study("--trainers", "PseudoLabel", "--labels", "3", "-p", LIKE, "--pretrained", checkpoint) == 2
    assert "PseudoLabel cells train through `nnunet-ext self-train`" in capsys.readouterr().err
    assert study("--trainers", "EncDec", "--labels", "3", "-p", LIKE, "--pretrained", str(tmp_path / "no.pth")) == 2
    assert "--pretrained" in capsys.readouterr().err and fake_nnunet.calls == []
    with monkeypatch.context() as m:  # planned with the checkpoint's path as typed, relative to its folder
        m.chdir(tmp_path)
        write_like_plans(fake_nnunet.preprocessed)  # the checkpoint fits, but CPC beside EncDec needs GroupNorm plans
    assert study("--trainers", "EncDec", "CPCSeg", "--labels", "3", "-p", LIKE, "--pretrained", checkpoint) == 2
    err = capsys.readouterr().err
    assert f"`nnunet-ext plan -d 42 --like-pretrained {checkpoint} --group-norm --preprocess` and rerun with " \
           "-p nnUNetLikePretrainedGNPlans" in err and fake_nnunet.calls == []
