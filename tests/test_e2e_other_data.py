"""End to end on data unlike the demo: one CT-like channel, plain labels (no regions), anisotropic spacing.

Defaults must follow from the plans and dataset.json: the branches take their input channels and target
count from them, the evaluation its regions, and CPC refuses a patch too small for its sub-patch grid
with a message that names the patch instead of crashing mid-training."""

from __future__ import annotations

import glob
import json
import os
import subprocess

import pytest
from conftest import check_predictions, nnunet_env, predict, run

pytestmark = pytest.mark.slow
DATASET_ID = 993
PLANS = "nnUNetCPUGNPlans"
SHORT = "3labels_1epochs_3iters_noMirroring"


@pytest.fixture(scope="module")
def ct_dataset(tmp_path_factory):
    env = nnunet_env(tmp_path_factory.mktemp("nnunet_ct"))
    run(["nnunet-ext", "make-demo-dataset", "-d", str(DATASET_ID), "--num-train", "8", "--num-test", "2",
         "--num-unlabeled", "2", "--shape", "24", "64", "64", "--spacing", "3", "1", "1"], env)
    raw = os.path.join(env["nnUNet_raw"], f"Dataset{DATASET_ID}_BraTSDemo")
    for f in glob.glob(os.path.join(raw, "images*", "*_000[123].nii.gz")):
        os.remove(f)
    with open(os.path.join(raw, "dataset.json")) as f:
        dataset_json = json.load(f)
    dataset_json.pop("regions_class_order")
    dataset_json.update(channel_names={"0": "CT"}, labels={"background": 0, "edema": 1, "core": 2, "enhancing": 3})
    with open(os.path.join(raw, "dataset.json"), "w") as f:
        json.dump(dataset_json, f)
    run(["nnunet-ext", "plan", "-d", str(DATASET_ID), "-pl", "nnUNetPlannerCPUGN", "-np", "1", "--preprocess"], env)
    run(["nnunet-ext", "preprocess-unlabeled", "-d", str(DATASET_ID), "-p", PLANS], env)
    env["nnUNet_n_proc_DA"] = "0"
    with open(os.path.join(env["nnUNet_preprocessed"], f"Dataset{DATASET_ID}_BraTSDemo", f"{PLANS}.json")) as f:
        plan = json.load(f)["configurations"]["3d_fullres"]
    return {"env": env, "id": DATASET_ID, "plans": PLANS, "raw": raw, "plan": plan}


def train(ds, trainer: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-p", PLANS, "-tr", trainer,
                           "-device", "cpu"], env=ds["env"], capture_output=True, text=True, timeout=900)


def test_plans_are_single_channel_and_anisotropic(ct_dataset):
    plan = ct_dataset["plan"]
    assert plan["normalization_schemes"] == ["CTNormalization"] and plan["spacing"][0] == 3.0
    assert plan["architecture"]["arch_kwargs"]["strides"][1][0] == 1  # no pooling along z at first: anisotropic
    assert min(plan["patch_size"]) < 48  # too small for CPC's 32^3 sub-patches, see below


@pytest.mark.parametrize("base", ["VAESegTrainer", "BoundSegTrainer", "ssVAESegTrainer"])
def test_branch_trainers_train_predict_and_evaluate(ct_dataset, base, tmp_path):
    ds = ct_dataset
    trainer = f"{base}_{SHORT}"
    proc = train(ds, trainer)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pred = tmp_path / "pred"
    predict(ds, trainer, [0], str(pred))
    check_predictions(ds, str(pred))
    run(["nnunet-ext", "evaluate", os.path.join(ds["raw"], "labelsTs"), str(pred), "-djfile",
         os.path.join(ds["raw"], "dataset.json"), "-o", str(tmp_path / "summary.json")], ds["env"])
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)["summary"]
    assert list(summary) == ["edema", "core", "enhancing"]  # plain labels, named by dataset.json


def test_cpc_refuses_a_patch_too_small_for_its_grid(ct_dataset):
    proc = train(ct_dataset, f"CPCSegTrainer_{SHORT}")
    assert proc.returncode != 0
    patch = tuple(ct_dataset["plan"]["patch_size"])
    # the ct plan's patch is 24 voxels on axis 0: below the 32-voxel sub-patch, and the message says what to plan
    assert "CPC needs at least 32 voxels on every axis" in proc.stderr and str(patch) in proc.stderr
    assert "plan a patch of at least 32 per axis and 64 along one axis" in proc.stderr
