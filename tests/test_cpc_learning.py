"""CPC learns where there is structure to predict: trained from scratch on smooth images, with the paper's
layout (no context sub-patch shares a voxel with a target), InfoNCE falls clearly below chance.

The negative control of issue #8 (random 16-pixel blocks, where only shared voxels could be predicted) is
not a test here: it stayed at chance (1.000) not only with this layout but also with the old overlapping
one and with a context that sees the target itself (benchmarks/cpc_controls.py, 300 steps), so it could
not fail; the no-overlap guarantee is tested from the positions themselves in test_branch_math.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from scipy.ndimage import gaussian_filter

from nnunet_ext.branches import CPCBranch, EncoderSpec, GroupNorm, cpc_grid

SHAPE = (64, 64)  # grid 3 x 3: context position 0, position 1 skipped, target position 2


def smooth_images(rng: np.random.RandomState, n: int) -> torch.Tensor:
    """Gaussian-filtered noise (sigma 10 px), unit std per image: neighbouring sub-patches are related."""
    x = np.stack([gaussian_filter(rng.standard_normal(SHAPE), 10) for _ in range(n)])[:, None]
    return torch.from_numpy((x / x.std(axis=(1, 2, 3), keepdims=True)).astype(np.float32))


@pytest.mark.slow
def test_infonce_falls_below_chance_on_structured_images():
    torch.manual_seed(0)
    rng = np.random.RandomState(0)
    encoder = PlainConvEncoder(1, 4, (16, 32, 64, 64), torch.nn.Conv2d, 3, (1, 2, 2, 2), 2, True, GroupNorm,
                               {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU, {"inplace": True},
                               return_skips=True)
    branch = CPCBranch(EncoderSpec.of(encoder), n_blocks=2)
    optimizer = torch.optim.Adam([*encoder.parameters(), *branch.parameters()], 1e-3)
    losses = []
    for _ in range(150):
        loss = branch(smooth_images(rng, 8), None, None, encoder)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    chance = math.log(math.prod(cpc_grid(SHAPE)))
    assert losses[0] == pytest.approx(chance, rel=0.1)  # starts at chance
    assert np.mean(losses[-50:]) < 0.85 * chance, (np.mean(losses[-50:]) / chance)  # measured 0.76
