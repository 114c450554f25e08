"""Pseudo-label self-training: the confidence rule on hand-computed inputs, the teacher/student pairing, the record
checks, and ``nnunet-ext self-train`` end to end through the real nnU-Net commands (leakage guard included)."""

from __future__ import annotations

import json
import math
import os
import subprocess

import numpy as np
import pytest

from nnunet_ext.data.pseudo_labels import (
    PSEUDO_IDS_FILE,
    RECORD,
    case_score,
    check_record,
    keep_most_confident,
    pseudo_label_folder,
)
from nnunet_ext.files import file_sha256
from nnunet_ext.selftrain import check_pair, default_teacher
from tests.conftest import run


def test_case_score_softmax_by_hand():
    # classes x 4 voxels; structure voxels are 1 (0.7) and 2 (0.3, 0.6); their decisions' probabilities 0.7, 0.6
    p = np.array([[0.9, 0.2, 0.1, 0.95], [0.05, 0.7, 0.3, 0.03], [0.05, 0.1, 0.6, 0.02]])
    assert case_score(p, regions=False) == pytest.approx(0.65)


def test_case_score_regions_by_hand():
    # regions x 3 voxels; structure voxels 0 and 2; least certain region: min(0.9, 0.6) and min(0.7, 0.9)
    p = np.array([[0.9, 0.1, 0.3], [0.6, 0.05, 0.1]])
    assert case_score(p, regions=True) == pytest.approx(0.65)


def test_case_without_structure_scores_zero_and_ranks_last():
    confident_background = np.array([[0.99, 0.99], [0.005, 0.01], [0.005, 0.0]])
    assert case_score(confident_background, regions=False) == 0.0
    assert case_score(np.full((3, 2, 2), 0.01), regions=True) == 0.0
    scores = {"empty": 0.0, "unsure": 0.6, "sure": 0.95}
    assert keep_most_confident(scores, 2 / 3) == ["sure", "unsure"]


def test_keep_most_confident_fraction_ties_and_errors():
    scores = {"d": 0.1, "c": 0.9, "b": 0.5, "a": 0.9}
    assert keep_most_confident(scores, 0.5) == ["a", "c"]  # ceil(0.5 * 4) = 2, tie broken by id
    assert keep_most_confident(scores, 0.01) == ["a"]  # at least one
    assert keep_most_confident(scores, 1.0) == ["a", "c", "b", "d"]
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="--keep"):
            keep_most_confident(scores, bad)
    with pytest.raises(ValueError, match="pool is empty"):
        keep_most_confident({}, 0.5)


def test_default_teacher_has_the_students_budget_schedule_and_seed():
    assert default_teacher("PseudoLabelTrainer_6labels") == "EncDecTrainer_6labels"
    assert (default_teacher("PseudoLabelTrainer_6labels_4unlabeled_2epochs_10iters_noMirroring_s1")
            == "EncDecTrainer_6labels_2epochs_10iters_noMirroring_s1")


@pytest.mark.parametrize("student, teacher, message", [
    ("PseudoLabelTrainer_6labels", "EncDecTrainer_12labels", "label budget and seed"),
    ("PseudoLabelTrainer_6labels_s1", "EncDecTrainer_6labels", "label budget and seed"),
    ("PseudoLabelTrainer_6labels", "PseudoLabelTrainer_6labels", "another trainer"),
    ("EncDecTrainer_6labels", "EncDecTrainer_6labels", "student"),
    ("PseudoLabelTrainer_6labels", "nnUNetTrainer", "does not start with one of our trainers"),
])
def test_teachers_that_saw_other_labels_are_refused(student, teacher, message):
    with pytest.raises(ValueError, match=message):
        check_pair(student, teacher)


def test_ss_and_other_budget_matched_teachers_are_accepted():
    check_pair("PseudoLabelTrainer_6labels_s2", "ssCPCSegTrainer_6labels_100unlabeled_s2")
    check_pair("PseudoLabelTrainer_6labels", "MeanTeacherTrainer_6labels")


def test_check_record_refuses_changed_pools_leaks_and_missing_cases(tmp_path):
    folder = str(tmp_path)
    os.makedirs(tmp_path / "cases")
    for case in ("u1", "u2"):
        (tmp_path / "cases" / f"{case}.pkl").write_bytes(b"")
    record = {"pool": ["u1", "u2", "u3"], "kept": ["u1", "u2"]}
    assert check_record(record, folder, ["u1", "u2", "u3"], ["l1"], ["v1"], {"t1"}) == ["u1", "u2"]
    with pytest.raises(ValueError, match="another unlabeled pool"):
        check_record(record, folder, ["u1", "u2"], ["l1"], ["v1"], {"t1"})
    with pytest.raises(ValueError, match=r"v1 \(validation case\)"):
        check_record({"pool": ["u1", "v1"], "kept": ["v1"]}, folder, ["u1", "v1"], ["l1"], ["v1"], set())
    with pytest.raises(ValueError, match=r"t1 \(test case\)"):
        check_record({"pool": ["t1"], "kept": ["t1"]}, folder, ["t1"], [], [], {"t1"})
    with pytest.raises(ValueError, match="missing from cases"):
        check_record({"pool": ["u3"], "kept": ["u3"]}, folder, ["u3"], [], [], set())


def test_study_trains_pseudo_label_cells_through_self_train():
    from nnunet_ext.pipeline import Experiment
    from nnunet_ext.study import Study, build_grid

    cells = build_grid(["EncDec", "PseudoLabel"], [3], [4], epochs=1, iters=2, mirroring=False)
    assert [c.trainer for c in cells] == ["EncDecTrainer_3labels_1epochs_2iters_noMirroring",
                                          "PseudoLabelTrainer_3labels_4unlabeled_1epochs_2iters_noMirroring"]
    experiment = Experiment(992, "Dataset992_X", {"nnUNet_results": "/r"}, "/logs", "P", "3d_fullres", "cpu")
    study = Study(experiment, "/raw", "/out", [0])
    assert study.train_command(cells[0], 0)[0] == "nnUNetv2_train"
    assert study.train_command(cells[1], 0) == [
        "nnunet-ext", "self-train", "-d", "992", "-tr", cells[1].trainer, "-f", "0", "-p", "P", "-c", "3d_fullres",
        "-device", "cpu"]
    # the teacher the student asks for is the grid's EncDec cell: trained once, reused
    assert default_teacher(cells[1].trainer) == cells[0].trainer


STUDENT = "PseudoLabelTrainer_3labels_4unlabeled_1epochs_2iters_noMirroring"
TEACHER = "EncDecTrainer_3labels_1epochs_2iters_noMirroring"


def self_train(ds: dict, *extra: str, fold: int = 0) -> subprocess.CompletedProcess:
    return subprocess.run(["nnunet-ext", "self-train", "-d", str(ds["id"]), "-tr", STUDENT, "-f", str(fold),
                           "-p", ds["plans"], "-device", "cpu", *extra], env=ds["env"], capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_self_train_end_to_end_with_leakage_guard(branch_dataset, monkeypatch):
    ds = branch_dataset
    proc = self_train(ds)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = ds["results"]
    teacher_fold = os.path.join(results, f"{TEACHER}__{ds['plans']}__3d_fullres", "fold_0")
    student_fold = os.path.join(results, f"{STUDENT}__{ds['plans']}__3d_fullres", "fold_0")
    assert os.path.isfile(os.path.join(teacher_fold, "checkpoint_final.pth"))
    assert os.path.isfile(os.path.join(student_fold, "checkpoint_final.pth"))

    folder = pseudo_label_folder(ds["preprocessed"], STUDENT, ds["plans"], "3d_fullres", 0)
    with open(os.path.join(folder, RECORD)) as f:
        record = json.load(f)
    with open(os.path.join(student_fold, "unlabeled_cases.json")) as f:
        unlabeled = json.load(f)
    with open(os.path.join(student_fold, "labeled_cases.json")) as f:
        labeled = json.load(f)["labeled"]
    validation = ds["splits"][0]["val"]
    # leakage guard: the copy of a validation case and the test case never reach the teacher's input
    assert {"LEAKVAL", *[c for c in ds["leaks"] if c != "LEAKVAL"]} <= set(unlabeled["excluded"])
    assert record["pool"] == unlabeled["unlabeled"] and len(record["pool"]) == 4
    assert not set(record["pool"]) & (set(validation) | set(labeled) | set(ds["leaks"]))
    assert sorted(os.listdir(os.path.join(folder, "input"))) == sorted(
        f"{c}_{k:04d}.nii.gz" for c in record["pool"] for k in range(4))
    assert set(record["scores"]) == set(record["pool"])
    assert len(record["kept"]) == math.ceil(0.5 * 4) and set(record["kept"]) <= set(record["pool"])
    assert min(record["scores"][c] for c in record["kept"]) >= max(record["scores"][c] for c in record["dropped"])
    assert record["teacher"] == TEACHER
    assert record["teacher_checkpoint_sha256"] == file_sha256(os.path.join(teacher_fold, "checkpoint_final.pth"))
    with open(os.path.join(student_fold, PSEUDO_IDS_FILE)) as f:
        used = json.load(f)
    assert used["pseudo_labeled"] == record["kept"] and used["teacher"] == TEACHER

    # the student's training set is the budget plus the kept cases, whose labels are the teacher's predictions
    import SimpleITK as sitk
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, ds["env"][var])
    student = get_trainer_from_args(str(ds["id"]), "3d_fullres", 0, STUDENT, ds["plans"], device=torch.device("cpu"))
    student.dataset_class = infer_dataset_class(student.preprocessed_dataset_folder)
    dataset_tr, dataset_val = student.get_tr_and_val_datasets()
    assert sorted(dataset_tr.identifiers) == sorted(labeled + record["kept"])
    assert sorted(dataset_val.identifiers) == sorted(validation)
    case = record["kept"][0]
    _, seg, _, _ = dataset_tr.load_case(case)
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "predictions", case + ".nii.gz")))
    assert set(np.unique(np.asarray(seg))) <= set(np.unique(predicted)) | {0, -1}  # -1: outside the nonzero mask
    assert (np.asarray(seg) > 0).sum() == pytest.approx((predicted > 0).sum(), rel=0.05)

    # rerun: every step is skipped and nothing is rewritten
    mtime = os.path.getmtime(os.path.join(folder, RECORD))
    proc = self_train(ds)
    assert proc.returncode == 0 and proc.stdout.count("already trained") == 2 and "already made" in proc.stdout
    assert os.path.getmtime(os.path.join(folder, RECORD)) == mtime
    # another rule or teacher is refused by name, nothing overwritten
    proc = self_train(ds, "--keep", "0.25")
    assert proc.returncode == 2 and "keep_fraction" in proc.stderr and folder in proc.stderr
    proc = self_train(ds, "--teacher", "EncDecTrainer_4labels_1epochs_2iters_noMirroring")
    assert proc.returncode == 2 and "label budget and seed" in proc.stderr
    assert os.path.getmtime(os.path.join(folder, RECORD)) == mtime


def test_student_refuses_pseudo_labels_when_the_test_split_cannot_be_read(make_trainer, monkeypatch):
    student = make_trainer("PseudoLabelTrainer_3labels")
    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(RuntimeError, match="nnUNet_raw is not set"):
        student.unlabeled_pool()  # what self-train asks before the teacher predicts
    with pytest.raises(RuntimeError, match="nnUNet_raw is not set"):
        student.get_tr_and_val_datasets()  # what training asks before it reads the pseudo labels


@pytest.mark.slow
def test_student_without_pseudo_labels_says_how_to_make_them(branch_dataset):
    ds = branch_dataset
    proc = subprocess.run(["nnUNetv2_train", str(ds["id"]), "3d_fullres", "1", "-p", ds["plans"], "-tr", STUDENT,
                           "-device", "cpu"], env=ds["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "nnunet-ext self-train" in proc.stdout + proc.stderr and "fold_1" in proc.stdout + proc.stderr
    run(["nnunet-ext", "self-train", "--help"], ds["env"])
