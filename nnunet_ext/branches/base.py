"""The interface every regularization branch implements (the trainers rely on it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn


class Branch(nn.Module):
    """A regularization branch attached to a planned nnU-Net encoder; ``forward`` returns its weighted loss.

    Called as ``branch(x, skips, target, encoder)`` with ``x`` the network input (B, C_in, *spatial),
    ``skips = encoder(x)`` (``skips[-1]`` is the bottleneck), ``target`` binary region masks
    (B, K, *spatial) as float, or None for unlabeled samples, and ``encoder`` the planned encoder itself
    (never stored on the branch, so its parameters are not duplicated). Returns a float32 scalar that
    already includes the branch's ``weight``.
    """

    needs_target: ClassVar[bool] = False
    needs_skips: ClassVar[bool] = True

    def __init__(self, weight: float):
        super().__init__()
        self.weight = float(weight)
        self.last_stats: dict[str, torch.Tensor | float] = {}  # what the latest forward wants monitored (detached)

    @classmethod
    def from_encoder(cls, encoder: nn.Module, patch_size: Sequence[int], input_channels: int,
                     num_target_channels: int, **kwargs) -> Branch:
        """Build the branch for ``encoder`` and training crops of ``patch_size``."""
        raise NotImplementedError

    def description(self, patch_size: Sequence[int]) -> str:
        """A line for the training log saying what the branch does on crops of ``patch_size`` ('' if nothing
        beyond its arguments)."""
        return ""

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor], target: torch.Tensor | None,
                encoder: nn.Module) -> torch.Tensor:
        """Return the weighted branch loss (float32 scalar)."""
        raise NotImplementedError
