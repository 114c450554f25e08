"""Hand-checked values for the branch losses, boundary targets and CPC grid."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, kl_divergence

from nnunet_ext.branches import (
    CPCBranch,
    EncoderSpec,
    boundary_beta,
    boundary_targets,
    cpc_grid,
    cpc_layout,
    extract_subpatches,
    info_nce,
    kl_standard_normal,
    prediction_axis,
    soft_dice_loss,
    weighted_bce,
)
from nnunet_ext.nn import GroupNorm


def test_kl_closed_form_hand_values():
    assert kl_standard_normal(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(0.5)
    logvar = torch.tensor([math.log(2.0)])
    assert kl_standard_normal(torch.tensor([0.0]), logvar).item() == pytest.approx(0.5 * (1 - math.log(2)))


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(3, 128), torch.randn(3, 128)
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).mean()
    assert kl_standard_normal(mu, logvar).item() == pytest.approx(expected.item(), rel=1e-5)


def test_boundary_of_cube_is_its_56_face_voxels():
    masks = torch.zeros(1, 1, 8, 8, 8)
    masks[..., 2:6, 2:6, 2:6] = 1
    b = boundary_targets(masks)
    assert b.shape == masks.shape and b.sum().item() == 56
    coords = b[0, 0].nonzero()
    assert ((coords == 2) | (coords == 5)).any(dim=1).all()
    assert b[..., 3:5, 3:5, 3:5].sum() == 0


def test_cube_touching_crop_border_gets_no_border_voxels():
    masks = torch.zeros(1, 1, 8, 8, 8)
    masks[..., :4, :4, :4] = 1
    b = boundary_targets(masks)
    assert b.sum().item() == 4**3 - 3**3  # only the faces at index 3 facing the background
    assert b[0, 0, 0, 0, 0] == 0 and b[0, 0, 0, 1, 2] == 0
    assert boundary_targets(torch.ones(1, 1, 4, 4, 4)).sum() == 0


def test_boundary_2d_square_and_channels_independent():
    masks = torch.zeros(2, 2, 8, 8)
    masks[0, 0, 2:6, 2:6] = 1
    masks[1, 1, 1:4, 1:3] = 1
    b = boundary_targets(masks)
    assert b[0, 0].sum().item() == 12 and b[0, 1].sum() == 0
    assert b[1, 1].sum().item() == 6  # a 3x2 rectangle is all edge
    assert b[1, 0].sum() == 0


def test_beta_is_non_boundary_share_per_sample():
    b = torch.tensor([[[1.0, 0, 0, 0]], [[1.0, 1, 0, 0]]])
    assert boundary_beta(b).tolist() == pytest.approx([0.75, 0.5])  # more boundary -> lower beta


def test_weighted_bce_hand_value():
    logits = torch.tensor([[[math.log(3), -math.log(3), 0.0, 0.0]]])  # p = 0.75, 0.25, 0.5, 0.5
    b = torch.tensor([[[1.0, 0, 0, 0]]])
    beta = 0.75
    expected = beta * -math.log(0.75) / 4 + (1 - beta) * -(math.log(0.75) + 2 * math.log(0.5)) / 4
    assert weighted_bce(logits, b).item() == pytest.approx(expected, rel=1e-6)
    assert weighted_bce(torch.zeros(1, 1, 4), b).item() == pytest.approx(3 * math.log(2) / 8, rel=1e-6)


def test_weighted_bce_weights_rare_boundary_errors_more():
    b = torch.tensor([[[1.0, 0, 0, 0]]])
    miss_boundary = torch.tensor([[[-2.0, -2, -2, -2]]])
    false_alarm = torch.tensor([[[2.0, 2, -2, -2]]])  # one wrong non-boundary voxel, same margin
    assert weighted_bce(miss_boundary, b) > weighted_bce(false_alarm, b)


def test_soft_dice_hand_value():
    probs = torch.tensor([[[1.0, 0.5]]])
    target = torch.tensor([[[1.0, 0.0]]])
    assert soft_dice_loss(probs, target).item() == pytest.approx(1 - 2 / 2.25, rel=1e-6)


@pytest.mark.parametrize(("size", "grid"), [(32, 1), (48, 2), (64, 3), (144, 8), (128, 7), (50, 2)])
def test_cpc_grid_sizes(size, grid):
    assert cpc_grid((size, 64)) == (grid, 3)


def test_cpc_grid_of_paper_crop():
    assert cpc_grid((144, 144, 128)) == (8, 8, 7)


def test_cpc_grid_rejects_small_patches_with_clear_message():
    with pytest.raises(ValueError, match=r"at least 32 voxels on every axis.*axis 1.*\(64, 20, 64\)"):
        cpc_grid((64, 20, 64))
    with pytest.raises(ValueError, match=r"64 voxels along one axis.*\(48, 48, 48\) has none"):
        cpc_grid((48, 48, 48))


@pytest.mark.parametrize(("grid", "axis"), [((8, 8, 7), 2), ((2, 2, 3), 2), ((3, 5, 2), 1), ((5, 3, 2), 0),
                                            ((4, 4, 2), 1), ((1, 3), 1)])
def test_prediction_axis_is_the_last_or_else_the_longest(grid, axis):
    assert prediction_axis(grid) == axis


@pytest.mark.parametrize(("g", "layout"), [(3, (1, 2)), (4, (1, 3)), (7, (3, 4)), (8, (3, 5))])
def test_cpc_layout_hand_values(g, layout):
    assert cpc_layout(g) == layout


@pytest.mark.parametrize("g", range(3, 10))
def test_no_context_subpatch_shares_a_voxel_with_a_target(g, monkeypatch):
    """From what grid_loss really feeds the context network and scores as positives: the voxel ranges
    [16 p, 16 p + 32) of context and target positions along the prediction axis are disjoint."""
    import nnunet_ext.branches.cpc as cpc

    seen = {}

    class Spy(nn.Module):
        def forward(self, z):
            seen["context"] = z
            return z

    def capture(pred, z, positive):
        seen["positive"] = positive
        return pred.sum() * 0

    monkeypatch.setattr(cpc, "info_nce", capture)
    branch = CPCBranch(EncoderSpec(nn.Conv3d, (4,), ((1, 1, 1),), ((3, 3, 3),), GroupNorm), n_blocks=1)
    branch.context = Spy()
    z = torch.arange(2 * g, dtype=torch.float32).view(1, 1, 2, g)  # each vector holds its flat grid index
    branch.grid_loss(z)
    context_positions = {int(v) % g for v in seen["context"].flatten()}
    target_positions = {int(i) % g for i in seen["positive"]}
    assert context_positions and target_positions and len(seen["positive"]) == 2 * len(context_positions)
    context_voxels = {v for p in context_positions for v in range(16 * p, 16 * p + 32)}
    target_voxels = {v for p in target_positions for v in range(16 * p, 16 * p + 32)}
    assert not context_voxels & target_voxels, (g, context_positions, target_positions)


def test_subpatches_are_row_major_crops():
    x = torch.randn(2, 3, 48, 64)
    patches = extract_subpatches(x)
    assert patches.shape == (2 * 2 * 3, 3, 32, 32)
    for n, (b, i, j) in enumerate((b, i, j) for b in range(2) for i in range(2) for j in range(3)):
        assert torch.equal(patches[n], x[b, :, 16 * i:16 * i + 32, 16 * j:16 * j + 32])


def test_info_nce_chance_level_is_log_g():
    z = torch.randn(2, 4, 10)
    assert info_nce(torch.zeros(2, 4, 3), z, torch.tensor([7, 8, 9])).item() == pytest.approx(math.log(10))


def test_grid_loss_equals_cross_entropy_built_by_hand():
    torch.manual_seed(0)
    spec = EncoderSpec(nn.Conv3d, (4,), ((1, 1, 1),), ((3, 3, 3),), GroupNorm)
    branch = CPCBranch(spec, n_blocks=2)
    z = torch.randn(2, 4, 2, 3, 5)  # last axis g = 5: context positions 0..1, 2 skipped, targets 3..4
    with torch.no_grad():
        loss = branch.grid_loss(z)
        context = branch.context(z[..., :2])
    flat = z.flatten(2)
    losses = []
    for b in range(2):
        for i in range(2):
            for j in range(3):
                for k in range(2):
                    positive = (i * 3 + j) * 5 + k + 3
                    logits = torch.stack([context[b, :, i, j, k] @ flat[b, :, n] for n in range(30)])
                    losses.append(F.cross_entropy(logits[None], torch.tensor([positive])))
    assert loss.item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)


@pytest.mark.parametrize(("channels", "groups"), [(8, 8), (12, 6), (5, 5), (320, 8), (4, 4), (14, 7)])
def test_groupnorm_picks_largest_divisor(channels, groups):
    norm = GroupNorm(channels, eps=1e-5, affine=True)
    assert norm.num_groups == groups and norm.num_channels == channels
