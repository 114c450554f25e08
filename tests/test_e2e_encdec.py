"""End to end through the real nnUNetv2_* commands: plan, preprocess, train 2 folds, predict, ensemble."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import run
from test_locks import dead_pid, write_lock

from nnunet_ext import locks

pytestmark = pytest.mark.slow
TRAINER = "EncDecTrainer_3labels_1epochs_4iters_noMirroring"


def _train(ds, trainer: str, fold: int, *extra: str) -> subprocess.CompletedProcess:
    return run(["nnUNetv2_train", str(ds["id"]), "3d_fullres", str(fold), "-p", "nnUNetCPUPlans", "-tr", trainer,
                "-device", "cpu", *extra], ds["env"])


def test_plans_are_small(tiny_dataset):
    plans = json.load(open(os.path.join(tiny_dataset["preprocessed"], "nnUNetCPUPlans.json")))
    cfg = plans["configurations"]["3d_fullres"]
    assert max(cfg["patch_size"]) <= 64 and cfg["batch_size"] <= 2
    assert max(cfg["architecture"]["arch_kwargs"]["features_per_stage"]) <= 64


def test_train_two_folds_predict_and_ensemble(tiny_dataset, tmp_path):
    ds = tiny_dataset
    out_base = os.path.join(ds["results"], f"{TRAINER}__nnUNetCPUPlans__3d_fullres")
    killed = Path(out_base, "fold_0", locks.LOCK_FILE)
    write_lock(killed, dead_pid())  # a run of this fold was killed: its lock is taken over, then released
    for fold in (0, 1):
        _train(ds, TRAINER, fold)
    assert not killed.exists()
    splits = json.load(open(os.path.join(ds["preprocessed"], "splits_final.json")))
    for fold in (0, 1):
        labeled = json.load(open(os.path.join(out_base, f"fold_{fold}", "labeled_cases.json")))
        assert len(labeled["labeled"]) == 3
        assert set(labeled["labeled"]) <= set(splits[fold]["train"])
        assert not set(labeled["labeled"]) & set(splits[fold]["val"])
        assert os.path.isfile(os.path.join(out_base, f"fold_{fold}", "checkpoint_final.pth"))

    best = run(["nnUNetv2_find_best_configuration", str(ds["id"]), "-c", "3d_fullres", "-tr", TRAINER,
                "-p", "nnUNetCPUPlans", "-f", "0", "1", "--disable_ensembling", "-np", "1"], ds["env"]).stdout
    assert f"-tr {TRAINER}" in best  # nnU-Net's own model selection accepts our trainers

    images = os.path.join(ds["raw"], "imagesTs")
    per_fold = []
    for fold in (0, 1):
        out = str(tmp_path / f"pred_f{fold}")
        run(["nnUNetv2_predict", "-i", images, "-o", out, "-d", str(ds["id"]), "-c", "3d_fullres",
             "-p", "nnUNetCPUPlans", "-tr", TRAINER, "-f", str(fold), "-device", "cpu", "--save_probabilities",
             "-npp", "1", "-nps", "1"], ds["env"])
        per_fold.append(out)
    ensemble = str(tmp_path / "ensemble")
    run(["nnUNetv2_ensemble", "-i", *per_fold, "-o", ensemble, "-np", "1"], ds["env"])
    run(["nnUNetv2_predict", "-i", images, "-o", str(tmp_path / "joint"), "-d", str(ds["id"]), "-c", "3d_fullres",
         "-p", "nnUNetCPUPlans", "-tr", TRAINER, "-f", "0", "1", "-device", "cpu", "-npp", "1", "-nps", "1"],
        ds["env"])
    for case in sorted(f for f in os.listdir(os.path.join(ds["raw"], "labelsTs"))):
        reference = sitk.ReadImage(os.path.join(ds["raw"], "labelsTs", case))
        for folder in (ensemble, str(tmp_path / "joint")):
            pred = sitk.ReadImage(os.path.join(folder, case))
            assert pred.GetSize() == reference.GetSize() and pred.GetSpacing() == reference.GetSpacing()
            assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2, 3}


def test_a_fold_being_trained_is_not_trained_twice(tiny_dataset):
    """A plain nnUNetv2_train of a fold that a live run is training is refused, naming that run, before it writes
    anything there (the trainer locks its fold, not only our study and demo)."""
    ds, trainer = tiny_dataset, "EncDecTrainer_3labels_1epochs_7iters_noMirroring"  # a name no other test trains
    fold = Path(ds["results"], f"{trainer}__nnUNetCPUPlans__3d_fullres", "fold_0")
    shutil.rmtree(fold.parent, ignore_errors=True)  # what another test of this session may have left there
    write_lock(fold / locks.LOCK_FILE, os.getpid())  # this test's process stands for the run training the fold
    env = {k: v for k, v in ds["env"].items() if k != locks.HOLDER_ENV}
    proc = subprocess.run(["nnUNetv2_train", str(ds["id"]), "3d_fullres", "0", "-p", "nnUNetCPUPlans", "-tr", trainer,
                           "-device", "cpu"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert f"training fold 0 of {trainer} ({fold}) is in use by pid {os.getpid()}" in proc.stdout + proc.stderr
    written = [f for f in os.listdir(fold) if f != locks.LOCK_FILE and not f.startswith("training_log_")]
    assert not written, written  # nothing but a log of its own: refused before training began


def test_bad_trainer_names_fail_clearly(tiny_dataset):
    ds = tiny_dataset
    cases = {"EncDecTrainer_0labels": "positive integer",
             "EncDecTrainer_3labels_5unlabeled": "semi-supervised",
             "EncDecTrainer_99labels_1epochs_2iters_noMirroring": "Label budget 99 exceeds the 8 training cases"}
    for trainer, message in cases.items():
        proc = subprocess.run(["nnUNetv2_train", str(ds["id"]), "3d_fullres", "0", "-p", "nnUNetCPUPlans",
                               "-tr", trainer, "-device", "cpu"], env=ds["env"], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode != 0
        assert message in proc.stdout + proc.stderr, (trainer, proc.stderr[-2000:])
