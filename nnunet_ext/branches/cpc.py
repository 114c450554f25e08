"""Contrastive predictive coding branch (paper Table S3, eq. 3) over a grid of overlapping sub-patches."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nnunet_ext.branches.base import Branch
from nnunet_ext.branches.blocks import EncoderSpec, ResBlock, conv1x1, encode_to_stage, stage_at_stride

_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)

# The released code pools the encoder output at 1/8 resolution (a 32-voxel sub-patch -> 4 voxels per axis, 256-d).
VECTOR_STRIDE = 8


MIN_PREDICTION_POSITIONS = 3  # context, at least one skipped position, target


def cpc_grid(patch_size: Sequence[int], size: int = 32, stride: int = 16) -> tuple[int, ...]:
    """Sub-patch grid per axis, ``(S - size) // stride + 1``, anchored at 0 (a remainder at the end is ignored).

    Every axis needs ``size`` voxels; one axis (see :func:`prediction_axis`) needs
    ``size + 2 * stride`` (64 voxels) for three positions.
    """
    grid = []
    for axis, s in enumerate(patch_size):
        if s < size:
            raise ValueError(f"CPC needs at least {size} voxels on every axis (one {size}-voxel sub-patch), but "
                             f"axis {axis} of patch size {tuple(patch_size)} has {s}; plan a patch of at least "
                             f"{size} per axis and {size + 2 * stride} along one axis")
        grid.append((int(s) - size) // stride + 1)
    prediction_axis(grid, patch_size, size, stride)
    return tuple(grid)


def prediction_axis(grid: Sequence[int], patch_size: Sequence[int] | None = None, size: int = 32,
                    stride: int = 16) -> int:
    """The grid axis CPC predicts along: the last one (as in the paper) when it has at least 3 positions,
    else the longest axis that has; ValueError when none has (``patch_size`` only words the message)."""
    if grid[-1] >= MIN_PREDICTION_POSITIONS:
        return len(grid) - 1
    long_enough = [a for a, g in enumerate(grid) if g >= MIN_PREDICTION_POSITIONS]
    if not long_enough:
        patch = f"patch size {tuple(patch_size)}" if patch_size is not None else f"sub-patch grid {tuple(grid)}"
        raise ValueError(
            f"CPC needs {size + 2 * stride} voxels along one axis (its prediction axis: three {size}-voxel sub-patches "
            f"with stride {stride}, so that no context sub-patch shares a voxel with a target) and {size} on the "
            f"others, but {patch} has none; plan a patch of at least {size + 2 * stride} voxels along the last axis "
            f"(axis {len(grid) - 1})")
    return max(long_enough, key=lambda a: (grid[a], a))


def cpc_layout(g: int) -> tuple[int, int]:
    """(h, offset) on a prediction axis of ``g`` positions: context = positions ``0 .. h-1``, targets =
    ``offset .. g-1`` with ``h = (g - 1) // 2`` and ``offset = g - h``; the context output at position ``k``
    predicts position ``k + offset``.

    At least one position (``g - 2h``) lies between the last context and the first target, so with
    ``size = 2 * stride`` (32 and 16) no context sub-patch shares a voxel with any target sub-patch. For the
    paper's g = 7: context 0-2, position 3 skipped, targets 4-6, offset 4 positions = 64 voxels.
    """
    if g < MIN_PREDICTION_POSITIONS:
        raise ValueError(f"a CPC prediction axis needs at least {MIN_PREDICTION_POSITIONS} positions, got {g}")
    h = (g - 1) // 2
    return h, g - h


def planned_chunk_size(patch_size: Sequence[int], batch_size: int, size: int = 32, stride: int = 16) -> int:
    """Sub-patches per checkpointed encoder call so that CPC's activations stay within what nnU-Net planned.

    nnU-Net budgets GPU memory for ``batch_size`` patches through the network; the overlapping
    sub-patches of a patch always hold more voxels than the patch (about (2 - 32/S)^d times; 5.4x at
    128^3), so encoding them at once would not fit. Chunks of floor(batch_size·prod(patch) / size^d)
    sub-patches keep each (recomputed) encoder call at the planned size.
    """
    cpc_grid(patch_size, size, stride)  # validates the patch
    return max(1, batch_size * math.prod(patch_size) // size ** len(patch_size))


def default_chunk_size(device: torch.device, patch_size: Sequence[int], batch_size: int) -> int | None:
    """CPCSegTrainer's chunking: on CUDA :func:`planned_chunk_size`; elsewhere None (one call, no recomputation,
    since host memory is not what nnU-Net planned for)."""
    return planned_chunk_size(patch_size, batch_size) if device.type == "cuda" else None


def extract_subpatches(x: torch.Tensor, size: int = 32, stride: int = 16) -> torch.Tensor:
    """All sub-patches of ``x`` (B, C, *spatial) as (B * G, C, size, ...), grid positions in row-major order."""
    ndim = x.ndim - 2
    patches = x
    for axis in range(ndim):
        patches = patches.unfold(2 + axis, size, stride)
    # (B, C, g_1..g_n, size_1..size_n) -> (B, g_1..g_n, C, size_1..size_n)
    patches = patches.movedim(1, 1 + ndim)
    return patches.reshape(-1, x.shape[1], *(size,) * ndim)


def info_nce(pred: torch.Tensor, z: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """InfoNCE of eq. 3 with raw dot-product scores.

    ``pred`` (B, D, P) are predicted vectors, ``z`` (B, D, G) all sub-patch vectors of the same images and
    ``positive`` (P,) the index in G of each prediction's true vector; the other G - 1 vectors of the
    image are the negatives. Cross-entropy over the G scores, averaged over predictions and batch
    (chance level ln G). Computed in float32 even under autocast (raw dot products can be large).
    """
    with torch.autocast(pred.device.type, enabled=False):
        logits = torch.einsum("bdp,bdg->bpg", pred.float(), z.float())
        return F.cross_entropy(logits.flatten(0, 1), positive.repeat(pred.shape[0]))


class CPCBranch(Branch):
    """CPC over 32-voxel sub-patches with stride 16, encoded by the segmentation encoder itself.

    Every sub-patch goes through ``encoder`` up to stage ``stage`` only (default: the deepest stage with
    cumulative stride at most :data:`VECTOR_STRIDE` = 8 on every axis, the released code's 1/8 resolution, or the
    deepest stage of a shallower encoder; :func:`~nnunet_ext.branches.blocks.stage_at_stride`), whose output is
    mean-pooled to z (B, D, *grid). Along the prediction axis (:func:`prediction_axis`, g
    positions) the context network (``n_blocks`` ResBlocks, then Conv1x1 "W") sees only the first h
    positions (:func:`cpc_layout`, h = (g - 1) // 2; all positions of the other axes); its output at
    position k predicts z at position k + g - h. No context sub-patch shares a voxel with a target, so the
    loss cannot fall by copying shared voxels. Candidates of each prediction (eq. 3): all G sub-patch
    vectors of the same image — context, skipped and target positions, the positive among them; vectors of
    other images in the batch are not used. Loss ``weight * info_nce`` (chance ln G). Gradients reach the
    encoder through both the predictions and the candidate vectors. ``chunk_size`` encodes that many
    sub-patches per call under activation checkpointing (None: one call, no checkpointing).
    """

    needs_target = False
    needs_skips = False

    def __init__(self, spec: EncoderSpec, weight: float = 1.0, size: int = 32, stride: int = 16,
                 chunk_size: int | None = None, stage: int | None = None, n_blocks: int = 8):
        super().__init__(weight)
        if stage is None:
            stage = stage_at_stride(spec.strides, VECTOR_STRIDE)
        self.size, self.stride, self.chunk_size = size, stride, chunk_size
        self.stage = stage % len(spec.channels)
        self.stage_stride = tuple(math.prod(s[a] for s in spec.strides[:self.stage + 1]) for a in range(spec.ndim))
        self.n_stages = len(spec.channels)
        channels = spec.channels[self.stage]
        self.context = nn.Sequential(*(ResBlock(spec.conv_op, channels) for _ in range(n_blocks)),
                                     conv1x1(spec.conv_op, channels, channels))

    @classmethod
    def from_encoder(cls, encoder: nn.Module, patch_size: Sequence[int], input_channels: int,
                     num_target_channels: int, **kwargs) -> CPCBranch:
        """Build the CPC branch; checks that ``patch_size`` holds a grid and warns on InstanceNorm encoders."""
        spec = EncoderSpec.of(encoder)
        branch = cls(spec, **kwargs)
        cpc_grid(patch_size, branch.size, branch.stride)
        if spec.norm_op is not None and issubclass(spec.norm_op, _INSTANCE_NORMS):
            warnings.warn(f"CPCBranch on an encoder normalised with {spec.norm_op.__name__}: instance "
                          "normalisation fixes the spatial mean of every sub-patch's features, so the pooled "
                          "vectors barely differ between sub-patches and InfoNCE stays at chance. Build the encoder "
                          "with norm_op 'nnunet_ext.nn.GroupNorm' (CPCSegTrainer does so on any plans).",
                          stacklevel=2)
        return branch

    def _pooled(self, encoder: nn.Module, subpatches: torch.Tensor) -> torch.Tensor:
        return encode_to_stage(encoder, subpatches, self.stage).flatten(2).mean(2)

    def encode(self, x: torch.Tensor, encoder: nn.Module) -> torch.Tensor:
        """Mean-pooled encoder features of every sub-patch of ``x``, shape (B, D, *grid)."""
        grid = cpc_grid(x.shape[2:], self.size, self.stride)
        subpatches = extract_subpatches(x, self.size, self.stride)
        if self.chunk_size is None:
            pooled = self._pooled(encoder, subpatches)
        else:
            pooled = torch.cat([checkpoint(self._pooled, encoder, chunk, use_reentrant=False)
                                for chunk in subpatches.split(self.chunk_size)])
        return pooled.view(x.shape[0], *grid, -1).movedim(-1, 1)

    def layout(self, g: int) -> tuple[int, int]:
        """(number of context positions, target offset) on a prediction axis of ``g`` positions
        (:func:`cpc_layout`); targets are the last ``g - offset`` positions."""
        return cpc_layout(g)

    def grid_loss(self, z: torch.Tensor) -> torch.Tensor:
        """Unweighted InfoNCE of the context network's predictions for the grid vectors ``z`` (B, D, *grid)."""
        axis = prediction_axis(z.shape[2:])
        z = z.float().movedim(2 + axis, -1)  # prediction axis last
        g = z.shape[-1]
        n_context, offset = self.layout(g)
        with torch.autocast(z.device.type, enabled=False):  # tiny grid: fp32 keeps GroupNorm stable
            prediction = self.context(z[..., :n_context])[..., :g - offset]  # sees the context positions only
        positive = torch.arange(z[0, 0].numel(), device=z.device).view(z.shape[2:])[..., offset:].flatten()
        return info_nce(prediction.flatten(2), z.flatten(2), positive)

    def description(self, patch_size: Sequence[int]) -> str:
        """What the branch does on crops of ``patch_size``: grid, prediction axis, context and target positions."""
        grid = cpc_grid(patch_size, self.size, self.stride)
        axis = prediction_axis(grid, patch_size, self.size, self.stride)
        g = grid[axis]
        n_context, offset = self.layout(g)
        skipped = f"{n_context}-{offset - 1}" if offset - 1 > n_context else str(n_context)
        return (f"sub-patch vectors pooled from encoder stage {self.stage} of {self.n_stages} (stride "
                f"{'x'.join(map(str, self.stage_stride))}); "
                f"sub-patch grid {grid} ({self.size}-voxel sub-patches, stride {self.stride}), prediction axis "
                f"{axis}: context positions 0-{n_context - 1}, skipped {skipped}, targets {offset}-{g - 1}; "
                f"{math.prod(grid)} candidates per prediction (chance {math.log(math.prod(grid)):.3f})")

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor], target: torch.Tensor | None,
                encoder: nn.Module) -> torch.Tensor:
        """Return ``weight * InfoNCE`` on the sub-patches of ``x`` as a float32 scalar; ``skips``, ``target``
        are unused. ``last_stats``: the mean L2 norm of the pooled vectors and the chance level ln G."""
        z = self.encode(x, encoder)
        self.last_stats = {"vector_norm": z.detach().float().norm(dim=1).mean(), "chance": math.log(z[0, 0].numel())}
        return self.weight * self.grid_loss(z)
