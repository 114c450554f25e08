"""Mean teacher (Tarvainen & Valpola 2017) on nnU-Net's planned network: the alternative nnU-Net users try.

Student = the network nnU-Net trains (its loss, loader, schedule, unchanged); teacher = an exponential
moving average (EMA) of the student's weights that never receives gradients. Each optimizer step adds a
consistency loss, the mean squared difference between student and teacher probabilities (sigmoid for
region datasets, softmax otherwise) on the same crops under different perturbations:

- labeled crops: the student's prediction is nnU-Net's own forward pass (no extra student pass); the teacher
  sees the same crop with an extra intensity perturbation;
- unlabeled crops (the ss trainers' loader, pool and leakage guard; ``_<M>unlabeled``): student and
  teacher each see the centre of the augmented crop with their own intensity perturbation; the student's
  pass is accumulated into nnU-Net's optimizer step like the ss trainers' unlabeled pass. The centre crops
  hold ``unlabeled_voxel_fraction`` (1/8) of the labeled batch's voxels: each is the patch scaled by
  ``fraction ** (1 / ndim)`` per axis, rounded up to the network's total stride, and a step draws as many
  as fit (at least one). That is what keeps a step within 1.6x nnU-Net's: a full-size unlabeled batch
  (student forward and backward, teacher forward) alone costs 1.33x a labeled step (docs/baselines.md).

The perturbation is per-sample intensity (multiply by ``1 + U(-s, s)``, add ``N(0, σ²)`` noise): nothing
spatial, so both predictions stay on the same voxels. The consistency weight ramps up with
``exp(-5 (1 - t)²)`` over the first ``rampup_fraction`` of training; the EMA decay is
``min(1 - 1 / (step + 1), ema_decay)`` (the paper's ramp). Both count the optimizer steps taken: a step that
AMP's GradScaler skips (inf/NaN gradients) moves neither the student nor the teacher.

Checkpoints: ``network_weights`` are the **student's**, as for every nnU-Net trainer (so ``nnUNetv2_predict``
and the final validation use the student, and the checkpoint loads strictly into the stock network);
``teacher_weights`` hold the teacher, and ``--c`` restores both.
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from nnunet_ext.branches.blocks import EncoderSpec
from nnunet_ext.compat import unwrap_network
from nnunet_ext.trainers.base import ExtTrainer
from nnunet_ext.trainers.names import TrainerSpec
from nnunet_ext.trainers.ramps import sigmoid_rampup
from nnunet_ext.trainers.semisupervised import SemiSupervisedMixin


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay of optimizer step ``step`` (0-based): ``min(1 - 1 / (step + 1), decay)``, so the teacher
    follows the student closely while the student changes fastest."""
    return min(1.0 - 1.0 / (step + 1), decay)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """``teacher = decay * teacher + (1 - decay) * student`` for every parameter; buffers are copied."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        t.copy_(s)


def perturb(x: torch.Tensor, scale: float, noise_std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample intensity perturbation: ``x * (1 + U(-scale, scale)) + N(0, noise_std²)``."""
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    factor = 1.0 + (torch.rand(shape, generator=generator, device="cpu") * 2 - 1).to(x) * scale
    noise = torch.randn(x.shape, generator=generator, device="cpu").to(x) * noise_std
    return x * factor + noise


def total_stride(strides) -> tuple[int, ...]:
    """Per axis, the product of an encoder's stage strides (what an input size must be a multiple of)."""
    return tuple(math.prod(axis) for axis in zip(*strides, strict=True))


def unlabeled_crops_per_step(batch_size: int, crop_share: float, voxel_fraction: float) -> int:
    """How many centre crops of ``crop_share`` of the patch keep the unlabeled voxels of a step within
    ``voxel_fraction`` of the labeled batch's: at least one, at most the batch size."""
    return min(batch_size, max(1, math.floor(batch_size * voxel_fraction / crop_share + 1e-9)))


def centre_crop_size(patch_size, stride, voxel_fraction: float) -> tuple[int, ...]:
    """Per axis, ``patch * voxel_fraction ** (1 / ndim)`` rounded up to a multiple of ``stride``, at least two
    strides (so the bottleneck keeps more than one voxel for instance norm) and at most the patch."""
    if not 0 < voxel_fraction <= 1:
        raise ValueError(f"voxel fraction must be in (0, 1], got {voxel_fraction}")
    per_axis = voxel_fraction ** (1 / len(patch_size))
    return tuple(min(int(p), max(2 * s, math.ceil(p * per_axis / s) * s))
                 for p, s in zip(patch_size, stride, strict=True))


def centre_crop(x: torch.Tensor, size) -> torch.Tensor:
    """The centre ``size`` of the spatial axes of a batch ``(b, c, *spatial)``."""
    starts = [(n - k) // 2 for n, k in zip(x.shape[2:], size, strict=True)]
    return x[(slice(None), slice(None), *(slice(a, a + k) for a, k in zip(starts, size, strict=True)))]


def plan_unlabeled_crops(patch_size, encoder: nn.Module, batch_size: int,
                         voxel_fraction: float) -> tuple[tuple[int, ...], int]:
    """(centre crop size, crops per step) of the unlabeled pass for a planned network's encoder: the one rule the
    trainer and the benchmark share."""
    crop = centre_crop_size(patch_size, total_stride(EncoderSpec.of(encoder).strides), voxel_fraction)
    return crop, unlabeled_crops_per_step(batch_size, math.prod(crop) / math.prod(patch_size), voxel_fraction)


def step_flop_ratio(crop_share: float, unlabeled_per_labeled: float) -> float:
    """FLOPs of a mean-teacher step over nnU-Net's, counting a forward as 1 and a backward as 2 per crop: the
    labeled step (3) + the teacher's labeled forward (1) + per unlabeled crop of ``crop_share`` of the patch
    a teacher forward and a student forward and backward (4 * share), over the labeled step's 3."""
    return (3 + 1 + 4 * crop_share * unlabeled_per_labeled) / 3


def probabilities(logits: torch.Tensor, regions: bool) -> torch.Tensor:
    """Sigmoid per region, or softmax over the class axis (1) of a batch."""
    return torch.sigmoid(logits.float()) if regions else torch.softmax(logits.float(), 1)


def consistency_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, regions: bool) -> torch.Tensor:
    """Mean squared difference of the two probability maps (the teacher's is a constant)."""
    return torch.mean((probabilities(student_logits, regions) - probabilities(teacher_logits, regions).detach()) ** 2)


def full_resolution(output):
    """The full-resolution output of a network with or without deep supervision."""
    return output[0] if isinstance(output, (list, tuple)) else output


class ConsistencyLoss(nn.Module):
    """nnU-Net's segmentation loss, plus ``weight * consistency`` when a teacher prediction is pending (training
    steps); validation outputs get nnU-Net's loss only. ``last`` keeps the detached parts for the log."""

    def __init__(self, seg_loss: nn.Module, regions: bool):
        super().__init__()
        self.seg_loss = seg_loss
        self.regions = regions
        self.pending: tuple[torch.Tensor, float] | None = None  # (teacher logits, weight)
        self.last: dict[str, torch.Tensor] = {}

    def forward(self, output, target):
        """Segmentation loss, plus the weighted consistency of a training step."""
        seg = self.seg_loss(output, target)
        pending, self.pending = self.pending, None
        if pending is None:
            return seg
        teacher, weight = pending
        consistency = consistency_loss(full_resolution(output), teacher, self.regions)
        self.last = {"seg_loss": seg.detach(), "consistency_labeled": consistency.detach()}
        return seg + weight * consistency


class MeanTeacherTrainer(SemiSupervisedMixin, ExtTrainer):
    """nnU-Net's network trained as the student of an EMA teacher, on labeled and unlabeled crops.

    ``consistency_weight`` is the ramped-up weight's final value; the perturbation is ``intensity_scale`` and
    ``noise_std`` (nnU-Net's images are z-scored, so these are in units of the image's standard deviation);
    ``unlabeled_voxel_fraction`` is the unlabeled voxels per step as a share of the labeled batch's (1.0: as
    many whole crops as labeled ones, 2.7x nnU-Net's step instead of 1.5x; see the module docstring).
    """

    trainer_spec = TrainerSpec(base="MeanTeacherTrainer")
    branch_class = None  # no branch: the unlabeled pass is the consistency loss
    ema_decay: ClassVar[float] = 0.99
    consistency_weight: ClassVar[float] = 1.0
    rampup_fraction: ClassVar[float] = 0.2
    intensity_scale: ClassVar[float] = 0.1
    noise_std: ClassVar[float] = 0.1
    unlabeled_voxel_fraction: ClassVar[float] = 1 / 8

    # -- building -----------------------------------------------------------------------------------
    def initialize(self):
        """nnU-Net's initialize, then the teacher: a copy of the student that never receives gradients."""
        super().initialize()
        student = unwrap_network(self.network, nn.Module)
        self.teacher = copy.deepcopy(student).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.decoder.deep_supervision = False  # the consistency uses the full-resolution output only
        self.loss = ConsistencyLoss(self.loss, self.label_manager.has_regions)
        self.mean_teacher_step = 0  # optimizer steps taken so far, i.e. teacher updates (restored by --c)
        self.optimizer.register_step_post_hook(lambda *_: self.follow_student())
        self.perturbation = torch.Generator().manual_seed(self.data_seed(self.budget_seed + 7))  # its own per rank
        patch = self.configuration_manager.patch_size
        self.unlabeled_crop, self.unlabeled_crops = plan_unlabeled_crops(patch, student.encoder, self.batch_size,
                                                                         self.unlabeled_voxel_fraction)
        share = math.prod(self.unlabeled_crop) / math.prod(patch)
        cost = step_flop_ratio(share, self.unlabeled_per_step() / self.batch_size)
        self.print_to_log_file(f"Mean teacher: unlabeled consistency on the centre {list(self.unlabeled_crop)} of "
                               f"the {list(patch)} patch ({share:.3f} of its voxels), {self.unlabeled_per_step()} "
                               f"per step; a step counts about {cost:.2f}x nnU-Net's FLOPs")

    def on_train_start(self):
        """nnU-Net's start of training; a fresh run's teacher starts as the student (which ``-pretrained_weights``
        may have loaded after ``initialize``); a resumed run keeps its checkpoint's teacher."""
        super().on_train_start()
        if self.mean_teacher_step == 0:
            self.teacher.load_state_dict(self.student.state_dict())

    def unlabeled_per_step(self) -> int:
        """Unlabeled centre crops per step (``unlabeled_crops_per_step``), unless ``unlabeled_batch_size`` says."""
        return self.unlabeled_batch_size or self.unlabeled_crops

    @property
    def student(self) -> nn.Module:
        """The student inside DDP / torch.compile wrappers."""
        return unwrap_network(self.network, nn.Module)

    def consistency_weight_now(self) -> float:
        """The consistency weight of the current step (sigmoid ramp-up over ``rampup_fraction`` of training)."""
        total = self.num_epochs * self.num_iterations_per_epoch
        return self.consistency_weight * sigmoid_rampup(self.mean_teacher_step, round(self.rampup_fraction * total))

    @torch.no_grad()
    def teacher_logits(self, data: torch.Tensor) -> torch.Tensor:
        """The teacher's full-resolution logits of a perturbed copy of ``data``."""
        data = perturb(data.to(self.device, non_blocking=True), self.intensity_scale, self.noise_std,
                       self.perturbation)
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            return full_resolution(self.teacher(data)).float()

    # -- training -----------------------------------------------------------------------------------
    def unlabeled_backward(self, data: torch.Tensor) -> torch.Tensor:
        """Forward and backward of the weighted consistency loss on the centre crops of an unlabeled batch
        (student and teacher each on their own perturbation); the gradient accumulates into nnU-Net's step (see
        SemiSupervisedMixin)."""
        data = centre_crop(data.to(self.device, non_blocking=True), self.unlabeled_crop)
        teacher = self.teacher_logits(data)
        student_input = perturb(data, self.intensity_scale, self.noise_std, self.perturbation)
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            student = full_resolution(self.student(student_input))
            loss = self.consistency_weight_now() * consistency_loss(student, teacher, self.label_manager.has_regions)
        (self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss).backward()
        return loss.detach()

    def follow_student(self) -> None:
        """The teacher's EMA update after an optimizer step of the student; counts the step.

        Called by the optimizer's step post-hook, so a step that AMP's GradScaler skips (inf/NaN gradients: it
        does not call ``optimizer.step()``) leaves the teacher and the count alone, as it leaves the student and
        the optimizer's state: the count is the teacher's (it ramps the EMA decay as an average over the
        student's states, like an optimizer's own step count), not the iteration's.
        """
        ema_update(self.teacher, self.student, ema_decay_at(self.mean_teacher_step, self.ema_decay))
        self.mean_teacher_step += 1

    def train_step(self, batch: dict) -> dict:
        """One step: the teacher's prediction of the labeled crops is handed to the loss, the ss step runs (the
        unlabeled consistency pass, then nnU-Net's labeled step), and the teacher follows the student if the
        optimizer stepped (:meth:`follow_student`)."""
        self.loss.pending = (self.teacher_logits(batch["data"]), self.consistency_weight_now())
        try:
            result = super().train_step(batch)
        finally:
            self.loss.pending = None
        result.update({k: v.cpu().numpy() for k, v in self.loss.last.items()})
        result["consistency_weight"] = np.float32(self.consistency_weight_now())
        return result

    # -- checkpoints --------------------------------------------------------------------------------
    def checkpoint_extras(self) -> dict:
        """``teacher_weights`` and the step count (the student is nnU-Net's ``network_weights``)."""
        return {"teacher_weights": self.teacher.state_dict(), "mean_teacher_step": self.mean_teacher_step}

    def restore_checkpoint_extras(self, checkpoint: dict, source: str) -> None:
        """The teacher and the step count (an error if they are missing)."""
        if "teacher_weights" not in checkpoint:
            raise RuntimeError(f"{source}: checkpoint has no 'teacher_weights'; it was not written "
                               f"by a {type(self).__name__} and cannot resume its teacher.")
        self.teacher.load_state_dict(checkpoint["teacher_weights"])
        self.mean_teacher_step = int(checkpoint["mean_teacher_step"])
