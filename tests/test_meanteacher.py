"""Mean teacher: EMA and ramp math on known numbers, the consistency loss, a teacher without gradients, and a
checkpoint that resumes both networks and loads into the stock network; end to end through the real CLI."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import check_predictions, predict, run

from nnunet_ext.trainers.meanteacher import (
    consistency_loss,
    ema_decay_at,
    ema_update,
    perturb,
    sigmoid_rampup,
)

MT = "MeanTeacherTrainer_3labels_1epochs_2iters_noMirroring"


def test_ema_update_moves_the_teacher_by_one_minus_decay_and_copies_buffers():
    teacher, student = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        teacher.weight.fill_(0.0)
        student.weight.fill_(1.0)
        student.running_mean.fill_(5.0)
    ema_update(teacher, student, 0.99)
    assert torch.allclose(teacher.weight, torch.full((3,), 0.01))
    assert torch.equal(teacher.running_mean, student.running_mean)
    ema_update(teacher, student, 0.0)  # decay 0: the teacher becomes the student
    assert torch.equal(teacher.weight, student.weight)


def test_ema_decay_ramps_to_its_ceiling():
    assert ema_decay_at(0, 0.99) == 0.0  # first step: the teacher is the student
    assert ema_decay_at(9, 0.99) == pytest.approx(0.9)
    assert ema_decay_at(10_000, 0.99) == 0.99


def test_sigmoid_rampup_known_values():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(500, 100) == 1.0
    assert sigmoid_rampup(0, 0) == 1.0


@pytest.mark.parametrize("regions", [True, False])
def test_consistency_is_zero_for_identical_predictions_and_only_the_student_gets_gradient(regions):
    torch.manual_seed(0)
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    assert consistency_loss(student, student.detach().clone(), regions).item() == 0.0
    teacher = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = consistency_loss(student, teacher, regions)
    assert loss.item() > 0
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None
    p = torch.sigmoid(student) if regions else torch.softmax(student, 1)
    q = torch.sigmoid(teacher) if regions else torch.softmax(teacher, 1)
    assert loss.item() == pytest.approx(torch.mean((p - q) ** 2).item())


def test_perturbation_is_per_sample_intensity_only():
    x = torch.zeros(3, 1, 8, 8)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(perturb(x, 0.1, 0.0, generator), x)  # no spatial change: zero stays zero
    ones = perturb(torch.ones(3, 1, 8, 8), 0.1, 0.0, generator)
    factors = ones.flatten(1)
    assert torch.all(factors == factors[:, :1]) and torch.all((factors - 1).abs() <= 0.1)
    assert len(set(factors[:, 0].tolist())) == 3  # each sample its own factor


@pytest.mark.slow
def test_step_trains_the_student_moves_the_teacher_and_checkpoint_resumes_both(make_trainer, tmp_path):
    trainer = make_trainer(MT)
    trainer.initialize()
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    trainer.on_train_epoch_start()
    student_before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    for _ in range(2):
        result = trainer.train_step(next(trainer.dataloader_train))
    assert {"loss", "seg_loss", "consistency_labeled", "unlabeled_branch_loss", "consistency_weight"} <= set(result)
    assert all(p.grad is None and not p.requires_grad for p in trainer.teacher.parameters())
    changed = [k for k in student_before if not torch.equal(student_before[k], trainer.student.state_dict()[k])]
    assert changed  # the student learned
    teacher = trainer.teacher.state_dict()
    assert any(not torch.equal(teacher_before[k], teacher[k]) for k in changed)  # the teacher followed
    assert not all(torch.equal(teacher[k], trainer.student.state_dict()[k]) for k in changed)  # but lags (EMA)
    assert trainer.mean_teacher_step == 2

    path = str(tmp_path / "checkpoint.pth")
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["mean_teacher_step"] == 2 and "teacher_weights" in checkpoint
    plain = type(trainer).build_network_architecture(  # what nnUNetPredictor builds
        trainer.plans_manager, trainer.configuration_manager, trainer.num_input_channels,
        trainer.label_manager.num_segmentation_heads, False)
    plain.load_state_dict(checkpoint["network_weights"], strict=True)  # the student, into the stock network

    resumed = make_trainer(MT)
    resumed.load_checkpoint(path)
    assert resumed.mean_teacher_step == 2
    for key, value in resumed.teacher.state_dict().items():
        assert torch.equal(value, teacher[key])
    for key, value in resumed.student.state_dict().items():
        assert torch.equal(value, trainer.student.state_dict()[key])
    torch.save({k: v for k, v in checkpoint.items() if k != "teacher_weights"}, tmp_path / "plain.pth")
    with pytest.raises(RuntimeError, match="no 'teacher_weights'"):
        make_trainer(MT).load_checkpoint(str(tmp_path / "plain.pth"))


@pytest.mark.slow
def test_mean_teacher_trains_and_predicts_through_the_real_commands(tiny_dataset, tmp_path):
    ds = tiny_dataset
    proc = run(["nnUNetv2_train", str(ds["id"]), "3d_fullres", "0", "-p", "nnUNetCPUPlans", "-tr", MT,
                "-device", "cpu"], ds["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    fold = os.path.join(ds["results"], f"{MT}__nnUNetCPUPlans__3d_fullres", "fold_0")
    with open(os.path.join(fold, "unlabeled_cases.json")) as f:
        unlabeled = json.load(f)
    with open(os.path.join(fold, "labeled_cases.json")) as f:
        labeled = json.load(f)
    assert unlabeled["unlabeled"] and not set(unlabeled["unlabeled"]) & set(labeled["labeled"])
    log_name = sorted(f for f in os.listdir(fold) if f.startswith("training_log"))[-1]  # this run's
    with open(os.path.join(fold, log_name)) as f:
        log = f.read()
    assert "consistency_labeled" in log and "unlabeled_branch_loss" in log
    out = tmp_path / "pred"
    predict(dict(ds, plans="nnUNetCPUPlans"), MT, [0], str(out))
    check_predictions(ds, str(out))
