"""Multi-task base trainer: nnU-Net's planned network plus one regularization branch on its encoder.

Training forward: ``skips = encoder(x)``, ``seg = decoder(skips)``, ``branch_loss = branch(x, skips, target,
encoder)``; total loss = nnU-Net's own segmentation loss (deep supervision, DC+BCE for regions) + the
branch loss. nnU-Net's train_step, validation and prediction run unchanged:

- the branch lives inside :class:`MultiTaskNetwork`, the module nnU-Net compiles, wraps in DDP and
  optimizes (one optimizer, one gradient clip);
- the per-batch branch input (region masks for branches that need them) is handed over through
  :meth:`MultiTaskTrainer.train_step` just before nnU-Net's own train_step runs the forward pass;
- the wrapper's ``state_dict`` is the segmentation network's, so ``network_weights`` in checkpoints
  load strictly into the plain planned network (what ``nnUNetv2_predict`` builds); the branch is saved
  under ``branch_weights`` and restored by ``--c``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from nnunet_ext.branches.base import Branch
from nnunet_ext.compat import (
    network_built_by,
    unwrap_network,
)
from nnunet_ext.trainers.base import ExtTrainer


@dataclass
class BranchBatch:
    """What the branch needs besides the image: region masks (B, K, *spatial), or None."""

    target: torch.Tensor | None


@dataclass
class MultiTaskOutput:
    """Training output of :class:`MultiTaskNetwork`: segmentation outputs and the branch loss."""

    seg: torch.Tensor | list[torch.Tensor]
    branch_loss: torch.Tensor


class MultiTaskNetwork(nn.Module):
    """The planned encoder-decoder (``net``) plus a branch; ``forward(x)`` is the plain segmentation.

    In training mode, a :class:`BranchBatch` stored in ``pending`` is consumed by the next forward,
    which then also runs the branch and returns a :class:`MultiTaskOutput`. ``state_dict`` and
    ``load_state_dict`` are the segmentation network's; the branch has ``branch.state_dict()``.
    """

    def __init__(self, net: nn.Module, branch: Branch):
        super().__init__()
        if not (hasattr(net, "encoder") and hasattr(net, "decoder")):
            raise TypeError(f"{type(net).__name__} has no encoder/decoder attributes; regularization branches "
                            "need an encoder-decoder network (PlainConvUNet, ResidualEncoderUNet, ...)")
        self.net = net
        self.branch = branch
        self.pending: BranchBatch | None = None

    @property
    def encoder(self) -> nn.Module:
        """The planned encoder."""
        return self.net.encoder

    @property
    def decoder(self) -> nn.Module:
        """The planned decoder (nnU-Net toggles its deep supervision)."""
        return self.net.decoder

    def forward(self, x: torch.Tensor):
        """Segmentation output; with a pending branch batch in training mode a :class:`MultiTaskOutput`."""
        skips = self.net.encoder(x)
        seg = self.net.decoder(skips)
        pending, self.pending = self.pending, None
        if pending is None or not self.training:
            return seg
        branch_loss = self.branch(x, skips, pending.target, self.net.encoder)
        return MultiTaskOutput(seg, branch_loss)

    def branch_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The branch loss of images without labels: encoder (when the branch needs its skips) and branch;
        the decoder does not run."""
        skips = self.net.encoder(x) if self.branch.needs_skips else None
        return self.branch(x, skips, None, self.net.encoder)

    def state_dict(self, *args, **kwargs):
        """The segmentation network's state dict (loads strictly into the plain planned network)."""
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load segmentation network weights (as saved by :meth:`state_dict`)."""
        return self.net.load_state_dict(state_dict, strict=strict, assign=assign)


class MultiTaskLoss(nn.Module):
    """nnU-Net's segmentation loss plus the branch loss; plain (validation) outputs pass through.

    ``last`` keeps the detached parts of the latest training loss for logging.
    """

    def __init__(self, seg_loss: nn.Module):
        super().__init__()
        self.seg_loss = seg_loss
        self.last: dict[str, torch.Tensor] = {}

    def forward(self, output, target):
        """Total loss of a training output, or nnU-Net's loss of a plain (validation) output."""
        if not isinstance(output, MultiTaskOutput):
            return self.seg_loss(output, target)
        seg = self.seg_loss(output.seg, target)
        self.last = {"seg_loss": seg.detach(), "branch_loss": output.branch_loss.detach()}
        return seg + output.branch_loss


class MultiTaskTrainer(ExtTrainer):
    """nnU-Net trainer with one regularization branch; subclasses name ``branch_class`` and its kwargs."""

    branch_class: ClassVar[type[Branch]]
    branch_kwargs: ClassVar[dict] = {}

    # -- building -----------------------------------------------------------------------------------
    def initialize(self):
        """nnU-Net's initialize, with the training network built as net + branch (inference stays plain)."""
        with network_built_by(self, self._build_training_network):
            super().initialize()
        self.loss = MultiTaskLoss(self.loss)

    def _build_training_network(self, plans_manager, configuration_manager, num_input_channels: int,
                                num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """The planned network (nnU-Net's static builder) wrapped with this trainer's branch."""
        net = type(self).build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                    num_output_channels, enable_deep_supervision)
        kwargs = self.branch_arguments()
        branch = self.branch_class.from_encoder(net.encoder, configuration_manager.patch_size,
                                                num_input_channels, self.num_branch_targets, **kwargs)
        self.print_to_log_file(f"{type(branch).__name__}: {sum(p.numel() for p in branch.parameters())} "
                               f"parameters, arguments {kwargs}")
        if branch.description(configuration_manager.patch_size):
            self.print_to_log_file(f"{type(branch).__name__}: {branch.description(configuration_manager.patch_size)}")
        return MultiTaskNetwork(net, branch)

    def branch_arguments(self) -> dict:
        """Keyword arguments of the branch (hook: derive them from the plans or the device)."""
        return dict(self.branch_kwargs)

    @property
    def num_branch_targets(self) -> int:
        """Number of binary masks a labeled sample gives the branch (regions, or foreground labels)."""
        lm = self.label_manager
        return len(lm.foreground_regions) if lm.has_regions else len(lm.foreground_labels)

    @property
    def multitask_network(self) -> MultiTaskNetwork:
        """The :class:`MultiTaskNetwork` inside DDP / torch.compile wrappers."""
        return unwrap_network(self.network, MultiTaskNetwork)

    # -- training -----------------------------------------------------------------------------------
    def branch_masks(self, target: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Binary masks (B, K, *spatial) from nnU-Net's full-resolution training target."""
        t = target[0] if isinstance(target, (list, tuple)) else target
        lm = self.label_manager
        if lm.has_regions:
            return t[:, :len(lm.foreground_regions)].float()
        return torch.cat([(t == label) for label in lm.foreground_labels], 1).float()

    def branch_batch(self, batch: dict) -> BranchBatch:
        """The branch's view of a training batch: region masks for branches that need them."""
        target = None
        if self.branch_class.needs_target:
            target = self.branch_masks(batch["target"]).to(self.device, non_blocking=True)
        return BranchBatch(target)

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's train_step, with the branch input handed to the network first."""
        self.multitask_network.pending = self.branch_batch(batch)
        try:
            result = super().train_step(batch)
        finally:
            self.multitask_network.pending = None
        result.update({k: v.cpu().numpy() for k, v in self.loss.last.items()})
        return result

    # -- checkpoints --------------------------------------------------------------------------------
    def checkpoint_extras(self) -> dict:
        """``branch_weights`` and ``branch_class`` (the optimizer state already covers the branch)."""
        branch = self.multitask_network.branch
        return {"branch_weights": branch.state_dict(), "branch_class": type(branch).__name__}

    def restore_checkpoint_extras(self, checkpoint: dict, source: str) -> None:
        """The branch weights (an error if they are missing)."""
        if "branch_weights" not in checkpoint:
            raise RuntimeError(f"{source}: checkpoint has no 'branch_weights'; it was not "
                               f"written by a {type(self).__name__} and cannot resume its branch.")
        self.multitask_network.branch.load_state_dict(checkpoint["branch_weights"])
