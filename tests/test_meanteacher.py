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
    centre_crop,
    centre_crop_size,
    consistency_loss,
    ema_decay_at,
    ema_update,
    perturb,
    sigmoid_rampup,
    step_flop_ratio,
    total_stride,
    unlabeled_crops_per_step,
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


def test_unlabeled_centre_crop_size_follows_patch_stride_and_fraction():
    assert total_stride([(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)]) == (4, 8, 8)
    assert centre_crop_size((64, 64, 64), (16, 16, 16), 1 / 8) == (32, 32, 32)
    # anisotropic plan: per axis half, rounded up to the stride, never above the patch
    assert centre_crop_size((20, 192, 160), (1, 32, 32), 1 / 8) == (10, 96, 96)
    # 2d: 1/8 of the pixels is 0.354 per axis: 28.3 -> 32, 33.9 -> 48
    assert centre_crop_size((80, 96), (16, 16), 1 / 8) == (32, 48)
    assert centre_crop_size((80, 96), (16, 16), 1.0) == (80, 96)
    # at least two strides per axis (a one-voxel bottleneck breaks instance norm), at most the patch
    assert centre_crop_size((32, 32, 32), (16, 16, 16), 1 / 8) == (32, 32, 32)
    assert centre_crop_size((16, 64, 64), (16, 16, 16), 1 / 8) == (16, 32, 32)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="voxel fraction"):
            centre_crop_size((64, 64, 64), (16, 16, 16), bad)


def test_unlabeled_crops_per_step_keep_the_voxel_share():
    assert unlabeled_crops_per_step(2, 1 / 8, 1 / 8) == 2  # 3d: half per axis, as many crops as labeled
    assert unlabeled_crops_per_step(2, 1 / 4, 1 / 8) == 1  # 2d 64x64 at stride 16: 32x32 is 1/4, so one crop
    assert unlabeled_crops_per_step(12, 1 / 4, 1 / 8) == 6
    assert unlabeled_crops_per_step(2, 1 / 2, 1 / 8) == 1  # at least one
    assert unlabeled_crops_per_step(2, 1.0, 1.0) == 2  # full crops: as many as labeled, never more


def test_centre_crop_takes_the_centre_of_every_sample():
    x = torch.arange(2 * 1 * 6 * 8, dtype=torch.float32).reshape(2, 1, 6, 8)
    crop = centre_crop(x, (2, 4))
    assert crop.shape == (2, 1, 2, 4)
    assert torch.equal(crop, x[:, :, 2:4, 2:6])


def test_step_flop_ratio_of_the_default_and_the_full_crop():
    assert step_flop_ratio(1 / 8, 1.0) == pytest.approx(1.5)  # the default: within the 1.6x target
    assert step_flop_ratio(1.0, 1.0) == pytest.approx(8 / 3)  # full unlabeled crops
    assert step_flop_ratio(0.0, 1.0) == pytest.approx(4 / 3)  # labeled consistency alone


@pytest.mark.slow
def test_step_trains_the_student_moves_the_teacher_and_checkpoint_resumes_both(make_trainer, tmp_path):
    trainer = make_trainer(MT)
    trainer.initialize()
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    trainer.on_train_epoch_start()
    inputs = []  # spatial shapes the student sees: labeled patches and unlabeled centre crops
    hook = trainer.student.register_forward_pre_hook(lambda _, args: inputs.append(tuple(args[0].shape[2:])))
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
    hook.remove()
    patch = tuple(trainer.configuration_manager.patch_size)
    crop = centre_crop_size(patch, total_stride(trainer.student.encoder.strides), trainer.unlabeled_voxel_fraction)
    assert crop != patch and trainer.unlabeled_crop == crop
    assert inputs == [crop, patch] * 2  # each step: unlabeled centre crops first, then nnU-Net's labeled pass
    crops = unlabeled_crops_per_step(trainer.batch_size, math.prod(crop) / math.prod(patch), 1 / 8)
    assert trainer.unlabeled_per_step() == crops

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


def test_a_step_the_grad_scaler_skips_moves_neither_the_student_nor_the_teacher(make_trainer):
    """AMP's GradScaler (as nnU-Net uses on GPU; here on CPU) skips the optimizer step when a gradient is inf:
    the teacher must skip its EMA update and the step count too."""
    trainer = make_trainer(MT)
    trainer.initialize()
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    with torch.no_grad():
        for p in trainer.teacher.parameters():
            p.add_(0.01)  # a teacher that differs from the student, so any EMA update shows
    student = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    teacher = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    weight = next(trainer.student.parameters())
    hook = weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    trainer.train_step(next(trainer.dataloader_train))
    hook.remove()
    assert trainer.grad_scaler.get_scale() == 2.0 ** 3  # the scaler found the inf, skipped the step, backed off
    assert all(torch.equal(v, student[k]) for k, v in trainer.student.state_dict().items())
    assert all(torch.equal(v, teacher[k]) for k, v in trainer.teacher.state_dict().items())
    assert trainer.mean_teacher_step == 0

    trainer.train_step(next(trainer.dataloader_train))  # a step taken: the teacher's first update (decay 0)
    assert trainer.grad_scaler.get_scale() == 2.0 ** 3 and trainer.mean_teacher_step == 1  # no inf: no back-off
    assert not torch.equal(weight, student[next(iter(student))])
    assert all(torch.equal(v, trainer.student.state_dict()[k]) for k, v in trainer.teacher.state_dict().items())


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
