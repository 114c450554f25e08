"""Dice and HD95: hand-computed values, a brute-force reference, and every empty-mask case."""

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from nnunet_ext.evaluation.metrics import dice, hd95, image_diagonal_mm, surface


def _brute_force_surface(mask: np.ndarray, connectivity: int) -> np.ndarray:
    """Mask voxels with a neighbour (face: connectivity 1, any: ndim) outside the mask or the image."""
    padded = np.pad(mask, 1, constant_values=False)
    outside_neighbour = np.zeros_like(mask)
    for offset in np.ndindex(*(3,) * mask.ndim):
        step = np.array(offset) - 1
        if 0 < np.abs(step).sum() <= connectivity:
            shifted = tuple(slice(1 + s, padded.shape[i] - 1 + s) for i, s in enumerate(step))
            outside_neighbour |= ~padded[shifted]
    return mask & outside_neighbour


def _brute_force_hd95(pred: np.ndarray, ref: np.ndarray, spacing, connectivity: int) -> float:
    """max of the directed 95th percentiles of all pairwise surface-voxel distances in mm."""
    a = np.argwhere(_brute_force_surface(pred, connectivity)) * np.asarray(spacing)
    b = np.argwhere(_brute_force_surface(ref, connectivity)) * np.asarray(spacing)
    distances = cdist(a, b)
    return max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95))


def _cube_and_centre() -> tuple[np.ndarray, np.ndarray]:
    """A 3×3×3 cube and its centre voxel in a 5×5×5 image."""
    cube = np.zeros((5, 5, 5), dtype=bool)
    cube[1:4, 1:4, 1:4] = True
    centre = np.zeros_like(cube)
    centre[2, 2, 2] = True
    return cube, centre


def test_dice_hand_computed():
    pred = np.array([1, 1, 0, 0], dtype=bool)
    ref = np.array([0, 1, 1, 1], dtype=bool)
    assert dice(pred, ref) == pytest.approx(2 * 1 / (2 + 3))
    assert dice(ref, ref) == 1.0
    assert dice(pred, ~pred) == 0.0


def test_surface_of_cube_is_all_but_centre():
    cube, centre = _cube_and_centre()
    for connectivity in (1, 3):
        np.testing.assert_array_equal(surface(cube, connectivity), cube & ~centre)


def test_hd95_cube_vs_centre_isotropic():
    # cube surface -> centre: 6 × 1, 12 × √2, 8 × √3; P95 of 26 values lands on √3; centre -> cube: 1
    cube, centre = _cube_and_centre()
    assert hd95(cube, centre, (1.0, 1.0, 1.0)) == pytest.approx(math.sqrt(3))
    assert hd95(centre, cube, (1.0, 1.0, 1.0)) == pytest.approx(math.sqrt(3))


def test_hd95_cube_vs_centre_anisotropic():
    # spacing (2, 1, 1): distances 4 × 1, 4 × √2, 2 × 2, 8 × √5, 8 × √6; P95 lands on √6
    cube, centre = _cube_and_centre()
    assert hd95(cube, centre, (2.0, 1.0, 1.0)) == pytest.approx(math.sqrt(6))


def test_hd95_percentile_interpolates_and_uses_spacing():
    # every pixel of a 1-pixel-high row is surface; distances to pixel 0 are 0..20 pixels: P95 = 19 pixels
    row = np.ones((1, 21), dtype=bool)
    first = np.zeros_like(row)
    first[0, 0] = True
    assert hd95(row, first, (1.0, 1.0)) == pytest.approx(19.0)
    assert hd95(row, first, (1.0, 0.5)) == pytest.approx(9.5)
    assert hd95(row, first, (7.0, 0.5)) == pytest.approx(9.5)


def test_hd95_single_voxels_follow_axis_order_of_spacing():
    a = np.zeros((6, 4, 4), dtype=bool)
    b = np.zeros_like(a)
    a[0, 1, 1] = True
    b[3, 1, 1] = True
    assert hd95(a, b, (2.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert hd95(a, b, (1.0, 2.0, 2.0)) == pytest.approx(3.0)
    assert hd95(a, a, (2.0, 1.0, 1.0)) == 0.0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.7, 1.3), (0.5, 2.5, 1.0)])
@pytest.mark.parametrize("connectivity", [1, 3])
def test_hd95_matches_brute_force(seed, spacing, connectivity):
    rng = np.random.default_rng(seed)
    shape = (7, 9, 6)
    pred = rng.random(shape) < rng.uniform(0.05, 0.6)
    ref = rng.random(shape) < rng.uniform(0.05, 0.6)
    if seed % 2:  # small objects away from the border exercise the crop to the union's bounding box
        pred[:2], ref[:3], pred[..., :2], ref[..., -1] = False, False, False, False
    pred[3, 4, 2] = ref[4, 4, 3] = True
    expected = _brute_force_hd95(pred, ref, spacing, connectivity)
    assert hd95(pred, ref, spacing, connectivity=connectivity) == pytest.approx(expected, rel=1e-9)


def test_image_diagonal_of_brats_image():
    assert image_diagonal_mm((240, 240, 155), (1.0, 1.0, 1.0)) == pytest.approx(373.13, abs=0.005)
    assert image_diagonal_mm((10, 20), (2.0, 0.5)) == pytest.approx(math.sqrt(20**2 + 10**2))


def test_empty_masks_brats_policy():
    empty = np.zeros((240, 240, 155), dtype=bool)
    one = empty.copy()
    one[100, 100, 70] = True
    assert dice(empty, empty, "brats") == 1.0
    assert hd95(empty, empty, (1.0, 1.0, 1.0), "brats") == 0.0
    for pred, ref in ((one, empty), (empty, one)):
        assert dice(pred, ref, "brats") == 0.0
        assert hd95(pred, ref, (1.0, 1.0, 1.0), "brats") == pytest.approx(373.13, abs=0.005)
    assert hd95(one, empty, (2.0, 1.0, 1.0), "brats") == pytest.approx(math.sqrt(480**2 + 240**2 + 155**2))


def test_empty_masks_nan_policy():
    empty = np.zeros((4, 5, 6), dtype=bool)
    one = empty.copy()
    one[1, 2, 3] = True
    assert math.isnan(dice(empty, empty, "nan"))
    assert math.isnan(hd95(empty, empty, (1.0, 1.0, 1.0), "nan"))
    for pred, ref in ((one, empty), (empty, one)):
        assert dice(pred, ref, "nan") == 0.0
        assert math.isnan(hd95(pred, ref, (1.0, 1.0, 1.0), "nan"))


def test_invalid_arguments_are_rejected():
    mask = np.ones((3, 3, 3), dtype=bool)
    with pytest.raises(ValueError, match="empty_policy"):
        dice(mask, mask, "zero")
    with pytest.raises(ValueError, match="empty_policy"):
        hd95(mask, mask, (1.0, 1.0, 1.0), "zero")
    with pytest.raises(ValueError, match="shape"):
        dice(mask, mask[:2])
    with pytest.raises(ValueError, match="spacing"):
        hd95(mask, mask, (1.0, 1.0))
