"""Shared fixtures: isolated nnU-Net folders and a tiny planned + preprocessed demo dataset."""

from __future__ import annotations

import os
import subprocess

import pytest

TINY_DATASET_ID = 991


def pytest_configure(config):
    """Under pytest-xdist, one torch thread per worker and per nnU-Net command it starts (our trainers honour
    OMP_NUM_THREADS): two workers of two threads each on two cores slow every training down many times over."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def run(cmd: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a real command; on failure show its output in the assertion message."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def predict(ds: dict, trainer: str, folds: list[int], out: str, *extra: str) -> None:
    """nnUNetv2_predict of the dataset's imagesTs with the fold ensemble of ``trainer`` (CPU)."""
    run(["nnUNetv2_predict", "-i", os.path.join(ds["raw"], "imagesTs"), "-o", out, "-d", str(ds["id"]),
         "-c", "3d_fullres", "-p", ds["plans"], "-tr", trainer, "-f", *map(str, folds), "-device", "cpu",
         "-npp", "0", "-nps", "0", *extra], ds["env"])  # sequential: no worker start-up


def check_predictions(ds: dict, folder: str) -> None:
    """Every test case is predicted with the reference's size and spacing and labels 0-3 only."""
    import numpy as np
    import SimpleITK as sitk

    for case in sorted(os.listdir(os.path.join(ds["raw"], "labelsTs"))):
        ref = sitk.ReadImage(os.path.join(ds["raw"], "labelsTs", case))
        pred = sitk.ReadImage(os.path.join(folder, case))
        assert pred.GetSize() == ref.GetSize() and pred.GetSpacing() == ref.GetSpacing()
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2, 3}


def nnunet_env(root) -> dict[str, str]:
    """Environment with nnU-Net folders under ``root`` and CPU-friendly process counts."""
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(root / var)
        os.makedirs(env[var], exist_ok=True)
    env.update(nnUNet_def_n_proc="2", nnUNet_n_proc_DA="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A 10-case 32^3 demo dataset, planned with nnUNetPlannerCPU and preprocessed (3d_fullres, imagesUnlabeled
    too)."""
    root = tmp_path_factory.mktemp("nnunet")
    env = nnunet_env(root)
    run(["nnunet-ext", "make-demo-dataset", "-d", str(TINY_DATASET_ID), "--num-train", "10", "--num-test", "2",
         "--num-unlabeled", "2", "--shape", "32", "32", "32"], env)
    run(["nnunet-ext", "plan", "-d", str(TINY_DATASET_ID), "-np", "1"], env)
    run(["nnUNetv2_preprocess", "-d", str(TINY_DATASET_ID), "-plans_name", "nnUNetCPUPlans", "-c", "3d_fullres",
         "-np", "1"], env)
    run(["nnunet-ext", "preprocess-unlabeled", "-d", str(TINY_DATASET_ID), "-p", "nnUNetCPUPlans"], env)
    env["nnUNet_n_proc_DA"] = "0"
    raw = os.path.join(env["nnUNet_raw"], f"Dataset{TINY_DATASET_ID}_BraTSDemo")
    return {"env": env, "id": TINY_DATASET_ID, "raw": raw, "root": root,
            "preprocessed": os.path.join(env["nnUNet_preprocessed"], f"Dataset{TINY_DATASET_ID}_BraTSDemo"),
            "results": os.path.join(env["nnUNet_results"], f"Dataset{TINY_DATASET_ID}_BraTSDemo")}


@pytest.fixture
def make_trainer(tiny_dataset, monkeypatch):
    """Build fold 0 of a trainer in this process, on the tiny dataset, as nnUNetv2_train does."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_def_n_proc", "nnUNet_n_proc_DA"):
        monkeypatch.setenv(var, tiny_dataset["env"][var])
    return lambda name: get_trainer_from_args(str(tiny_dataset["id"]), "3d_fullres", 0, name, "nnUNetCPUPlans",
                                              device=torch.device("cpu"))


BRANCH_DATASET_ID = 992


@pytest.fixture(scope="session")
def branch_dataset(tmp_path_factory):
    """A 10-case 52x52x72 demo dataset on GroupNorm CPU plans (patch 48x48x64, CPC-capable) with preprocessed
    imagesUnlabeled that also holds leaking copies: a fold-0 validation case under another name and a
    test case under its own id."""
    import json
    import shutil

    from nnunetv2.utilities.crossval_split import generate_crossval_split

    root = tmp_path_factory.mktemp("nnunet_branches")
    env = nnunet_env(root)
    name = f"Dataset{BRANCH_DATASET_ID}_BraTSDemo"
    run(["nnunet-ext", "make-demo-dataset", "-d", str(BRANCH_DATASET_ID), "--num-train", "10", "--num-test", "2",
         "--num-unlabeled", "4", "--shape", "52", "52", "72"], env)
    run(["nnunet-ext", "plan", "-d", str(BRANCH_DATASET_ID), "-pl", "nnUNetPlannerCPUGN", "-np", "1",
         "--preprocess"], env)
    raw = os.path.join(env["nnUNet_raw"], name)
    preprocessed = os.path.join(env["nnUNet_preprocessed"], name)
    train_ids = sorted({f[:-12] for f in os.listdir(os.path.join(raw, "imagesTr"))})
    splits = generate_crossval_split(train_ids, seed=12345, n_splits=5)  # what nnU-Net would write
    with open(os.path.join(preprocessed, "splits_final.json"), "w") as f:
        json.dump(splits, f)
    val_case = splits[0]["val"][0]
    test_case = sorted(os.listdir(os.path.join(raw, "labelsTs")))[0][:-7]
    for c in range(4):
        shutil.copy(os.path.join(raw, "imagesTr", f"{val_case}_{c:04d}.nii.gz"),
                    os.path.join(raw, "imagesUnlabeled", f"LEAKVAL_{c:04d}.nii.gz"))
        shutil.copy(os.path.join(raw, "imagesTs", f"{test_case}_{c:04d}.nii.gz"),
                    os.path.join(raw, "imagesUnlabeled", f"{test_case}_{c:04d}.nii.gz"))
    run(["nnunet-ext", "preprocess-unlabeled", "-d", str(BRANCH_DATASET_ID), "-p", "nnUNetCPUGNPlans"], env)
    env["nnUNet_n_proc_DA"] = "0"
    return {"env": env, "id": BRANCH_DATASET_ID, "raw": raw, "preprocessed": preprocessed, "splits": splits,
            "leaks": {"LEAKVAL": val_case, test_case: "test"}, "plans": "nnUNetCPUGNPlans",
            "results": os.path.join(env["nnUNet_results"], name)}
