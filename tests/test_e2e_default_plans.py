"""The plans every nnU-Net user has: nnU-Net's own default planners (InstanceNorm, 6 stages, total stride 32),
their plans edited to tiny features so they train on CPU, and the real nnUNetv2_* commands.

CPC trainers train the GroupNorm copy of such plans; nnU-Net writes it into the results folder, and
nnUNetv2_predict builds exactly that network (it reproduces the fold's validation segmentation). From
InstanceNorm plans CPC learns (InfoNCE below chance); the same network left on InstanceNorm does not.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import check_predictions, nnunet_env, predict, run

from nnunet_ext.planners.groupnorm import GROUP_NORM

pytestmark = pytest.mark.slow
DATASET_ID = 994
NAME = f"Dataset{DATASET_ID}_BraTSDemo"
PLANS = {"plain": "nnUNetPlans", "residual": "nnUNetResEncUNetMPlans"}
SHORT = "1epochs_4iters_noMirroring"


def six_stages(plans_file: str) -> None:
    """Edit 3d_fullres of a default plans file to a BraTS-like depth (6 stages, strides 1,2,2,2,2,2, total
    stride 32) with tiny features and a 64^3 patch, keeping its norm (InstanceNorm) and everything else."""
    with open(plans_file) as f:
        plans = json.load(f)
    configuration = plans["configurations"]["3d_fullres"]
    arch = configuration["architecture"]["arch_kwargs"]
    arch.update(n_stages=6, features_per_stage=[4, 8, 16, 16, 16, 16], kernel_sizes=[[3, 3, 3]] * 6,
                strides=[[1, 1, 1]] + [[2, 2, 2]] * 5)
    if "n_blocks_per_stage" in arch:  # residual encoder
        arch.update(n_blocks_per_stage=[1] * 6, n_conv_per_stage_decoder=[1] * 5)
    else:
        arch.update(n_conv_per_stage=[2] * 6, n_conv_per_stage_decoder=[2] * 5)
    configuration.update(patch_size=[64, 64, 64], batch_size=2)
    with open(plans_file, "w") as f:
        json.dump(plans, f, indent=2)


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory):
    """10 demo cases of 64^3, planned by nnU-Net's default planner and its ResEnc M planner (edited by
    :func:`six_stages`), preprocessed by nnU-Net."""
    env = nnunet_env(tmp_path_factory.mktemp("nnunet_default_plans"))
    run(["nnunet-ext", "make-demo-dataset", "-d", str(DATASET_ID), "--num-train", "10", "--num-test", "2",
         "--num-unlabeled", "0", "--shape", "64", "64", "64"], env)
    run(["nnUNetv2_extract_fingerprint", "-d", str(DATASET_ID), "-np", "1"], env)
    preprocessed = os.path.join(env["nnUNet_preprocessed"], NAME)
    for planner, plans in (("ExperimentPlanner", PLANS["plain"]), ("nnUNetPlannerResEncM", PLANS["residual"])):
        run(["nnUNetv2_plan_experiment", "-d", str(DATASET_ID), "-pl", planner], env)
        six_stages(os.path.join(preprocessed, f"{plans}.json"))
        run(["nnUNetv2_preprocess", "-d", str(DATASET_ID), "-plans_name", plans, "-c", "3d_fullres", "-np", "1"], env)
    env["nnUNet_n_proc_DA"] = "0"
    return {"env": env, "id": DATASET_ID, "raw": os.path.join(env["nnUNet_raw"], NAME), "preprocessed": preprocessed,
            "results": os.path.join(env["nnUNet_results"], NAME)}


def with_plans(ds: dict, kind: str) -> dict:
    return {**ds, "plans": PLANS[kind]}


def train(ds: dict, trainer: str, fold: int = 0) -> str:
    """nnUNetv2_train on CPU; the fold's results folder."""
    run(["nnUNetv2_train", str(ds["id"]), "3d_fullres", str(fold), "-p", ds["plans"], "-tr", trainer,
         "-device", "cpu"], ds["env"])
    return os.path.join(ds["results"], f"{trainer}__{ds['plans']}__3d_fullres", f"fold_{fold}")


def training_log(folder: str) -> str:
    log = next(f for f in sorted(os.listdir(folder)) if f.startswith("training_log"))
    with open(os.path.join(folder, log)) as f:
        return f.read()


def norm_of(plans_file: str) -> str:
    with open(plans_file) as f:
        return json.load(f)["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["norm_op"]


def test_default_plans_are_instancenorm_with_six_stages(default_dataset):
    for plans in PLANS.values():
        with open(os.path.join(default_dataset["preprocessed"], f"{plans}.json")) as f:
            arch = json.load(f)["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
        assert arch["n_stages"] == 6 and arch["norm_op"].endswith("InstanceNorm3d")


def test_cpcseg_on_default_plans_trains_and_nnunet_predict_reproduces_its_validation(default_dataset, tmp_path):
    """The headline command on InstanceNorm plans: trains the GroupNorm copy, says so once, and nnUNetv2_predict
    (which builds the network from the results folder's plans.json) reproduces the fold's validation output."""
    ds = with_plans(default_dataset, "plain")
    trainer = f"CPCSegTrainer_{SHORT}"
    folder = train(ds, trainer)
    log = training_log(folder)
    assert len(re.findall(r"normalise with .*InstanceNorm3d; training with nnunet_ext\.nn\.GroupNorm", log)) == 1
    assert "pooled from encoder stage 3 of 6 (stride 8x8x8)" in log
    assert norm_of(os.path.join(os.path.dirname(folder), "plans.json")) == GROUP_NORM
    assert norm_of(os.path.join(ds["preprocessed"], f"{ds['plans']}.json")).endswith("InstanceNorm3d")  # untouched
    validation = os.path.join(folder, "validation")
    cases = sorted(f[:-7] for f in os.listdir(validation) if f.endswith(".nii.gz"))
    assert cases
    images = tmp_path / "images"
    images.mkdir()
    for case in cases:
        for c in range(4):
            shutil.copy(os.path.join(ds["raw"], "imagesTr", f"{case}_{c:04d}.nii.gz"), images)
    out = tmp_path / "pred"
    run(["nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", str(ds["id"]), "-c", "3d_fullres", "-p",
         ds["plans"], "-tr", trainer, "-f", "0", "-device", "cpu", "-npp", "0", "-nps", "0"], ds["env"])
    for case in cases:
        predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
        validated = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(validation, f"{case}.nii.gz")))
        assert np.array_equal(predicted, validated), case
    # nnUNetv2_find_best_configuration reads the same plans.json and passes it on to prediction and ensembling
    run(["nnUNetv2_find_best_configuration", str(ds["id"]), "-c", "3d_fullres", "-p", ds["plans"], "-tr", trainer,
         "-f", "0", "--disable_ensembling", "-np", "1"], ds["env"])
    with open(os.path.join(ds["results"], "inference_information.json")) as f:
        chosen = json.load(f)["best_model_or_ensemble"]
    assert norm_of(chosen["some_plans_file"]) == GROUP_NORM


def test_sscpcseg_trains_on_default_plans(default_dataset):
    ds = with_plans(default_dataset, "plain")
    folder = train(ds, f"ssCPCSegTrainer_3labels_{SHORT}")
    log = training_log(folder)
    assert "training with nnunet_ext.nn.GroupNorm" in log and re.search(r"unlabeled_branch_loss [0-9.]+", log)
    assert norm_of(os.path.join(os.path.dirname(folder), "plans.json")) == GROUP_NORM


def test_cpcseg_trains_and_predicts_on_a_residual_encoder_plan(default_dataset, tmp_path):
    ds = with_plans(default_dataset, "residual")
    trainer = f"CPCSegTrainer_{SHORT}"
    folder = train(ds, trainer)
    assert norm_of(os.path.join(os.path.dirname(folder), "plans.json")) == GROUP_NORM
    assert "pooled from encoder stage 3 of 6" in training_log(folder)
    predict(ds, trainer, [0], str(tmp_path / "pred"))
    check_predictions(ds, str(tmp_path / "pred"))


def cpc_losses(ds: dict, monkeypatch, steps: int) -> tuple[list[float], float]:
    """InfoNCE of ``steps`` steps of CPCSegTrainer's branch on the default plans, in this process: the trainer's
    network, nnU-Net's loader and augmentation, nnU-Net's optimizer (SGD, momentum 0.99) and gradient clip;
    and the chance level (ln of the candidates per prediction)."""
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunet_ext.branches.cpc import cpc_grid

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA"):
        monkeypatch.setenv(var, ds["env"][var])
    torch.manual_seed(0)
    np.random.seed(0)
    trainer = get_trainer_from_args(str(ds["id"]), "3d_fullres", 1, "CPCSegTrainer_noMirroring", ds["plans"],
                                    device=torch.device("cpu"))
    trainer.initialize()
    loader, _ = trainer.get_dataloaders()
    network = trainer.multitask_network.train()
    losses = []
    for _ in range(steps):
        trainer.optimizer.zero_grad(set_to_none=True)
        loss = network.branch.grid_loss(network.branch.encode(next(loader)["data"], network.encoder))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
        trainer.optimizer.step()
        losses.append(loss.item())
    return losses, math.log(math.prod(cpc_grid(trainer.configuration_manager.patch_size)))


def test_cpc_learns_from_instancenorm_plans_and_would_not_on_instancenorm(default_dataset, monkeypatch):
    """Positive: CPCSegTrainer started from the InstanceNorm plans (so training their GroupNorm copy) brings InfoNCE
    below chance within 20 steps. Negative control: the same trainer, data and steps with the network left on
    InstanceNorm stays at chance (measured: 0.43 vs 1.00 of chance over the last 5 steps)."""
    import nnunet_ext.trainers.cpc as cpc_trainers

    ds = with_plans(default_dataset, "plain")
    learned, chance = cpc_losses(ds, monkeypatch, 20)
    monkeypatch.setattr(cpc_trainers, "group_norm_plans", lambda plans: (plans, {}))
    stuck, _ = cpc_losses(ds, monkeypatch, 20)
    print(f"chance {chance:.3f}; GroupNorm copy {[round(x, 3) for x in learned]}; InstanceNorm "
          f"{[round(x, 3) for x in stuck]}")
    assert learned[0] == pytest.approx(chance, rel=0.1)
    assert np.mean(learned[-5:]) < 0.8 * chance
    assert np.mean(stuck[-5:]) > 0.97 * chance
