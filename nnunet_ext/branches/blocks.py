"""Small building blocks shared by the regularization branches (pure torch, 2D or 3D)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# plans written before GroupNorm moved to nnunet_ext.nn name it by this module's path: keep it importable
from nnunet_ext.nn import GroupNorm


def conv_ndim(conv_op: type[nn.Module]) -> int:
    """Spatial dimensionality of ``conv_op`` (nn.Conv2d -> 2, nn.Conv3d -> 3)."""
    for ndim, op in ((3, nn.Conv3d), (2, nn.Conv2d)):
        if issubclass(conv_op, op):
            return ndim
    raise ValueError(f"conv_op must be nn.Conv2d or nn.Conv3d (or a subclass), got {conv_op!r}")


class ResBlock(nn.Module):
    """Pre-activation residual block of the paper: (GN-ReLU-Conv) x2 + identity, channels unchanged."""

    def __init__(self, conv_op: type[nn.Module], channels: int, kernel_size: int | Sequence[int] = 3):
        super().__init__()
        ndim = conv_ndim(conv_op)
        kernel = (kernel_size,) * ndim if isinstance(kernel_size, int) else tuple(kernel_size)
        layers: list[nn.Module] = []
        for _ in range(2):
            layers += [GroupNorm(channels), nn.ReLU(inplace=True),
                       conv_op(channels, channels, kernel, padding=tuple(k // 2 for k in kernel))]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x + body(x)``."""
        return x + self.body(x)


@dataclass(frozen=True)
class EncoderSpec:
    """What a branch needs to know about a planned nnU-Net encoder (PlainConvEncoder or ResidualEncoder)."""

    conv_op: type[nn.Module]
    channels: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    norm_op: type[nn.Module] | None

    @classmethod
    def of(cls, encoder: nn.Module) -> EncoderSpec:
        """Read the spec from an encoder exposing dynamic_network_architectures' attributes."""
        ndim = conv_ndim(encoder.conv_op)

        def per_axis(v: int | Sequence[int]) -> tuple[int, ...]:
            return tuple(int(i) for i in v) if hasattr(v, "__len__") else (int(v),) * ndim

        return cls(conv_op=encoder.conv_op, channels=tuple(int(c) for c in encoder.output_channels),
                   strides=tuple(per_axis(s) for s in encoder.strides),
                   kernel_sizes=tuple(per_axis(k) for k in encoder.kernel_sizes), norm_op=encoder.norm_op)

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return len(self.strides[0])

    def stage_shapes(self, patch_size: Sequence[int]) -> list[tuple[int, ...]]:
        """Spatial shape of every stage output for an input of ``patch_size`` (same-padded convs: ceil division)."""
        shapes, shape = [], tuple(int(s) for s in patch_size)
        for stride in self.strides:
            shape = tuple(math.ceil(s / st) for s, st in zip(shape, stride, strict=True))
            shapes.append(shape)
        return shapes


def stage_at_stride(strides: Sequence[Sequence[int]], stride: int) -> int:
    """The deepest encoder stage whose cumulative stride is at most ``stride`` along every axis (stage 0 when even
    the first stage downsamples more), for ``strides`` per stage as planned (e.g. 1,2,2,2,2,2 and stride 8 -> 3)."""
    cumulative = [1] * len(strides[0])
    chosen = 0
    for index, stage_strides in enumerate(strides):
        cumulative = [c * int(s) for c, s in zip(cumulative, stage_strides, strict=True)]
        if max(cumulative) > stride:
            break
        chosen = index
    return chosen


def encode_to_stage(encoder: nn.Module, x: torch.Tensor, stage: int) -> torch.Tensor:
    """The output of encoder stage ``stage`` for input ``x``, running the stem and the stages up to it only.

    dynamic_network_architectures' PlainConvEncoder and ResidualEncoder compute ``stem`` (if any, residual
    encoders only) and then ``stages`` in order, returning every stage's output as the skips; stopping at
    ``stage`` gives ``encoder(x)[stage]`` without the deeper stages' cost. tests/test_branch_shapes.py checks the
    equality against the installed encoders.
    """
    stages = getattr(encoder, "stages", None)
    if not isinstance(stages, nn.Sequential):
        raise TypeError(f"{type(encoder).__name__} has no 'stages' (nn.Sequential) to run up to stage {stage}; "
                        "expected a dynamic_network_architectures PlainConvEncoder or ResidualEncoder")
    stem = getattr(encoder, "stem", None)
    if stem is not None:
        x = stem(x)
    for block in stages[:stage % len(stages) + 1]:
        x = block(x)
    return x


def conv1x1(conv_op: type[nn.Module], in_channels: int, out_channels: int) -> nn.Module:
    """1x1(x1) convolution built from ``conv_op``."""
    return conv_op(in_channels, out_channels, kernel_size=1)


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(Bi/tri)linearly resample ``x`` (B, C, *spatial) to ``size``; no-op when the size already matches."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="trilinear" if x.ndim == 5 else "bilinear", align_corners=False)
