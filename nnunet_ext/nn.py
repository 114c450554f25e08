"""Layers that plans files name by dotted path (``nnunet_ext.nn.<Layer>``): public API, kept importable."""

from __future__ import annotations

from torch import nn


class GroupNorm(nn.GroupNorm):
    """GroupNorm usable as nnU-Net ``norm_op``: ``GroupNorm(num_channels, eps, affine, num_groups=8)``.

    Uses the largest group count <= ``num_groups`` that divides ``num_channels``. The GroupNorm plans
    (``nnunet_ext.planners.groupnorm``) name it ``nnunet_ext.nn.GroupNorm``; plans written before it moved name
    ``nnunet_ext.branches.blocks.GroupNorm``, which stays an alias.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, num_groups: int = 8):
        groups = next(g for g in range(min(num_groups, num_channels), 0, -1) if num_channels % g == 0)
        super().__init__(groups, num_channels, eps=eps, affine=affine)
