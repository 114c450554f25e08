"""Boundary-attention regularization branch (paper Table S2, eq. 2): predict the inner edges of the labels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ext.branches.base import Branch
from nnunet_ext.branches.blocks import EncoderSpec, ResBlock, conv1x1, resize


def boundary_targets(masks: torch.Tensor) -> torch.Tensor:
    """Inner-edge boundaries (float 0/1, same shape) of binary masks (B, K, *spatial), 2D or 3D.

    A voxel is boundary when it is inside the mask (> 0.5) and the 6-neighbour (3D) or 4-neighbour (2D)
    Laplacian ``2 * ndim * m - sum(neighbours)`` is positive there, i.e. at least one neighbour is outside.
    Replicate padding makes voxels beyond the crop count as equal, so crop borders are not boundaries.
    """
    ndim = masks.ndim - 2
    if ndim not in (2, 3):
        raise ValueError(f"masks must be (B, K, *spatial) with 2 or 3 spatial axes, got shape {tuple(masks.shape)}")
    m = (masks > 0.5).float()
    padded = F.pad(m, (1, 1) * ndim, mode="replicate")
    laplacian = 2 * ndim * m
    for axis in range(ndim):
        for start in (0, 2):
            index = [slice(None), slice(None)] + [slice(1, -1)] * ndim
            index[2 + axis] = slice(start, start + m.shape[2 + axis])
            laplacian = laplacian - padded[tuple(index)]
    return ((m > 0) & (laplacian > 0)).float()


def soft_dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Paper eq. 1, ``1 - 2 sum(p b) / (sum(p^2) + sum(b^2) + eps)``, summed over batch and spatial axes
    per channel of (B, K, *spatial), then averaged over the K channels."""
    axes = [0, *range(2, probs.ndim)]
    intersection = (probs * target).sum(axes)
    denominator = (probs.square() + target.square()).sum(axes)
    return (1 - 2 * intersection / (denominator + eps)).mean()


def boundary_beta(boundaries: torch.Tensor) -> torch.Tensor:
    """Per-sample beta of eq. 2: share of non-boundary voxels over all channels and voxels, shape (B,)."""
    return 1 - boundaries.flatten(1).float().mean(1)


def weighted_bce(logits: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """Class-balanced BCE of eq. 2 for logits and 0/1 boundaries (B, K, *spatial).

    Per sample: ``-beta * mean(b log p) - (1 - beta) * mean((1 - b) log(1 - p))``, means over all channels
    and voxels, beta from ``boundary_beta`` (rare boundary voxels get the large weight); then the mean
    over the batch. Uses logsigmoid for stability.
    """
    beta = boundary_beta(boundaries)
    positive = -(boundaries * F.logsigmoid(logits)).flatten(1).mean(1)
    negative = -((1 - boundaries) * F.logsigmoid(-logits)).flatten(1).mean(1)
    return (beta * positive + (1 - beta) * negative).mean()


class BoundaryBranch(Branch):
    """Boundary-attention stream from the bottleneck up to the input size; loss ``weight * (Dice + L_edge)``.

    Per encoder stage, deepest-1 down to 0: Conv1x1 to the stage's channels and linear upsampling to the
    stage's size, ResBlock, then attention ``sigmoid(Conv1x1(concat(stream, skip)))`` (1 channel) multiplied
    onto the stream. Finally upsampling to the input size and Conv1x1 to K boundary logits, one per
    target channel. Dice per ``soft_dice_loss`` on sigmoid probabilities, L_edge per ``weighted_bce``.
    """

    needs_target = True
    needs_skips = True

    def __init__(self, spec: EncoderSpec, num_target_channels: int, weight: float = 1.0):
        super().__init__(weight)
        conv, ch = spec.conv_op, spec.channels
        stages = range(len(ch) - 2, -1, -1)
        self.num_target_channels = num_target_channels
        self.up_convs = nn.ModuleList(conv1x1(conv, ch[s + 1], ch[s]) for s in stages)
        self.blocks = nn.ModuleList(ResBlock(conv, ch[s], spec.kernel_sizes[s]) for s in stages)
        self.attention = nn.ModuleList(conv1x1(conv, 2 * ch[s], 1) for s in stages)
        self.out = conv1x1(conv, ch[0], num_target_channels)

    @classmethod
    def from_encoder(cls, encoder: nn.Module, patch_size: Sequence[int], input_channels: int,
                     num_target_channels: int, **kwargs) -> BoundaryBranch:
        """Build the boundary branch predicting one boundary map per target channel."""
        return cls(EncoderSpec.of(encoder), num_target_channels, **kwargs)

    def boundary_logits(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """Return boundary logits (B, K, *x.shape[2:])."""
        h = skips[-1]
        for up_conv, block, attention, skip in zip(self.up_convs, self.blocks, self.attention,
                                                   reversed(skips[:-1]), strict=True):
            h = block(resize(up_conv(h), skip.shape[2:]))
            h = h * torch.sigmoid(attention(torch.cat([h, skip], dim=1)))
        return self.out(resize(h, x.shape[2:]))

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor], target: torch.Tensor | None,
                encoder: nn.Module) -> torch.Tensor:
        """Return ``weight * (Dice + L_edge)`` against the boundaries of ``target`` as a float32 scalar."""
        if target is None:
            raise ValueError("BoundaryBranch needs label masks (target is None): call it on labeled samples "
                             "only; unlabeled images can train the VAE or CPC branch")
        expected = (x.shape[0], self.num_target_channels, *x.shape[2:])
        if tuple(target.shape) != expected:
            raise ValueError(f"target has shape {tuple(target.shape)}, expected {expected}: one binary mask per "
                             f"region at the input resolution")
        logits = self.boundary_logits(x, skips).float()
        boundaries = boundary_targets(target)
        return self.weight * (soft_dice_loss(torch.sigmoid(logits), boundaries) + weighted_bce(logits, boundaries))
