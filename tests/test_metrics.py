"""Dice, HD95, NSD and lesion-wise scores: hand-computed values, closed forms, a brute-force reference, and
every empty-mask case."""

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from nnunet_ext.evaluation.lesions import BRATS_2023_GLIOMA, LesionwiseParameters, lesionwise
from nnunet_ext.evaluation.metrics import (
    EMPTY_POLICIES,
    dice,
    hd95,
    hd95_surfels,
    image_diagonal_mm,
    nsd,
    surface,
)
from nnunet_ext.evaluation.surfaces import CORNERS, area_percentile, cell_area_table, cell_codes


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


# Surface elements weighted by area (DeepMind's surface-distance computation, as BraTS 2023 and MSD use it)


def _single_corner_code(a: int, b: int, c: int) -> int:
    return 1 << (4 * a + 2 * b + c)


def test_cell_areas_hand_computed():
    unit = cell_area_table((1.0, 1.0, 1.0))
    assert unit[0] == 0.0 and unit[255] == 0.0
    # one corner inside: a triangle through three edge midpoints, sides √2/2, area √3/8
    for corner in CORNERS:
        assert unit[_single_corner_code(*corner)] == pytest.approx(math.sqrt(3) / 8)
        assert unit[255 - _single_corner_code(*corner)] == pytest.approx(math.sqrt(3) / 8)
    edge = _single_corner_code(0, 0, 0) | _single_corner_code(0, 0, 1)  # a 1 × √2/2 rectangle
    assert unit[edge] == pytest.approx(math.sqrt(2) / 2)
    face_a0 = sum(_single_corner_code(0, b, c) for b in (0, 1) for c in (0, 1))  # a unit square
    face_c0 = sum(_single_corner_code(a, b, 0) for a in (0, 1) for b in (0, 1))
    assert unit[face_a0] == pytest.approx(1.0) and unit[face_c0] == pytest.approx(1.0)
    aniso = cell_area_table((2.0, 1.0, 3.0))  # a plane across axis 0 spans axes 1 and 2: 1 × 3 mm
    assert aniso[face_a0] == pytest.approx(3.0) and aniso[face_c0] == pytest.approx(2.0)
    # the corner triangle's vertices at (1, 0, 0), (0, 0.5, 0), (0, 0, 1.5) mm
    assert aniso[_single_corner_code(0, 0, 0)] == pytest.approx(0.5 * math.sqrt(0.75**2 + 1.5**2 + 0.5**2))


def test_cell_codes_cover_the_mask_with_the_image_border_outside():
    voxel = np.ones((1, 1, 1), dtype=bool)
    codes = cell_codes(voxel)
    assert codes.shape == (2, 2, 2)
    assert sorted(codes.ravel().tolist()) == sorted(_single_corner_code(*c) for c in CORNERS)
    # a single voxel's surface: 8 corner triangles forming an octahedron of area √3
    assert cell_area_table((1.0, 1.0, 1.0))[codes].sum() == pytest.approx(math.sqrt(3))


def test_weighted_percentile_takes_no_interpolation():
    distances, areas = np.array([3.0, 1.0, 2.0]), np.array([0.1, 0.5, 0.4])
    assert area_percentile(distances, areas, 95) == 3.0  # cumulative area 0.5, 0.9, 1.0
    assert area_percentile(distances, areas, 80) == 2.0
    assert area_percentile(distances, areas, 40) == 1.0


def test_surfel_hd95_and_nsd_of_two_voxels_anisotropic():
    # voxels 3 apart along axis 0 of 2 mm: the 4 near surfels of each lie 2 voxels (4 mm) from the other's
    # near surfels, the 4 far ones 3 voxels (6 mm); all 8 have the same area
    a = np.zeros((6, 3, 3), dtype=bool)
    b = np.zeros_like(a)
    a[1, 1, 1] = b[4, 1, 1] = True
    spacing = (2.0, 1.0, 1.0)
    assert hd95_surfels(a, b, spacing) == pytest.approx(6.0)
    assert nsd(a, b, spacing, tolerance_mm=4.0) == pytest.approx(0.5)
    assert nsd(a, b, spacing, tolerance_mm=3.9) == 0.0
    assert nsd(a, b, spacing, tolerance_mm=6.0) == pytest.approx(1.0)
    assert hd95_surfels(a, a, spacing) == 0.0 and nsd(a, a, spacing) == 1.0


def _ball(shape, centre_mm, radius_mm, spacing) -> np.ndarray:
    """Voxels whose centre lies within ``radius_mm`` of ``centre_mm``."""
    grid = np.indices(shape, dtype=float) * np.asarray(spacing, dtype=float)[:, None, None, None]
    return np.sum((grid - np.asarray(centre_mm)[:, None, None, None]) ** 2, axis=0) <= radius_mm**2


@pytest.mark.parametrize("spacing, axis", [((1.0, 1.0, 1.0), 2), ((2.0, 1.0, 1.0), 0), ((2.0, 1.0, 1.0), 2)])
def test_sphere_vs_shifted_sphere_matches_closed_form(spacing, axis):
    # two spheres of radius R shifted by d: the distance from one surface to the other is uniform on [0, d]
    # (area fraction within x is x/d), so HD95 = 0.95 d and NSD(τ) = τ/d for τ < d. Surfels sit at cell
    # centres, within half a cell diagonal h of the surface: the discrete values lie within h of these.
    radius, shift = 20.0, 8.0
    shape = tuple(int(56 / s) for s in spacing)
    centre = np.full(3, 24.0)
    ref = _ball(shape, centre, radius, spacing)
    pred = _ball(shape, centre + np.eye(3)[axis] * shift, radius, spacing)
    h = 0.5 * math.hypot(*spacing)
    assert abs(hd95_surfels(pred, ref, spacing) - 0.95 * shift) <= h
    for tolerance in (2.0, 4.0, 6.0):
        assert abs(nsd(pred, ref, spacing, tolerance) - tolerance / shift) <= h / shift


def test_nsd_and_surfel_hd95_empty_masks():
    empty = np.zeros((4, 5, 6), dtype=bool)
    one = empty.copy()
    one[1, 2, 3] = True
    assert nsd(empty, empty, (1.0, 1.0, 1.0)) == 1.0
    assert math.isnan(nsd(empty, empty, (1.0, 1.0, 1.0), empty_policy="nan"))
    assert hd95_surfels(empty, empty, (1.0, 1.0, 1.0)) == 0.0
    for pred, ref in ((one, empty), (empty, one)):
        for policy in EMPTY_POLICIES:
            assert nsd(pred, ref, (1.0, 1.0, 1.0), empty_policy=policy) == 0.0
        assert hd95_surfels(pred, ref, (2.0, 1.0, 1.0)) == pytest.approx(math.sqrt(8**2 + 5**2 + 6**2))
        assert math.isnan(hd95_surfels(pred, ref, (1.0, 1.0, 1.0), "nan"))
    with pytest.raises(ValueError, match="3D"):
        nsd(np.ones((3, 3), dtype=bool), np.ones((3, 3), dtype=bool), (1.0, 1.0))


# Lesion-wise Dice and HD95 (BraTS 2023)

PENALTY = BRATS_2023_GLIOMA.hd95_penalty_mm


def _cubes(*corners, edge: int = 4, shape=(40, 40, 40)) -> np.ndarray:
    """A mask of cubes of ``edge`` voxels with the given lowest corners."""
    mask = np.zeros(shape, dtype=bool)
    for z, y, x in corners:
        mask[z : z + edge, y : y + edge, x : x + edge] = True
    return mask


def test_lesionwise_two_lesions_one_missed():
    ref = _cubes((2, 2, 2), (20, 20, 20))  # 64 voxels each, far apart
    result = lesionwise(_cubes((2, 2, 2)), ref, (1.0, 1.0, 1.0))
    assert [(lesion.lesion_id, lesion.voxels, lesion.components) for lesion in result.lesions] == [
        (1, 64, (1,)), (2, 64, ())]
    assert [(lesion.dice, lesion.hd95) for lesion in result.lesions] == [(1.0, 0.0), (0.0, PENALTY)]
    assert result.dice == pytest.approx(0.5) and result.hd95 == pytest.approx(PENALTY / 2)
    assert result.false_positives == ()


def test_lesionwise_false_positive_component():
    ref = _cubes((2, 2, 2))
    pred = ref | _cubes((30, 30, 30), edge=3)
    result = lesionwise(pred, ref, (1.0, 1.0, 1.0))
    assert [(fp.component, fp.voxels) for fp in result.false_positives] == [(2, 27)]
    assert result.dice == pytest.approx(1 / 2) and result.hd95 == pytest.approx(PENALTY / 2)
    assert lesionwise(pred, ref, (1.0, 1.0, 1.0), LesionwiseParameters(3, 50.0, 337.0)).hd95 == pytest.approx(337 / 2)


def test_component_near_a_lesion_counts_for_it_not_as_false_positive():
    # 2 voxels of background between lesion and component: inside the 3-voxel dilation, so matched (Dice 0)
    ref = _cubes((10, 10, 10))
    pred = _cubes((10, 10, 16))
    result = lesionwise(pred, ref, (1.0, 1.0, 1.0))
    assert result.false_positives == () and result.lesions[0].components == (1,)
    assert result.dice == 0.0 and result.hd95 == pytest.approx(hd95_surfels(pred, ref, (1.0, 1.0, 1.0)))
    assert 0 < result.hd95 < PENALTY


def test_reference_components_merged_by_dilation():
    # 3 dilations grow each cube by 3 voxels: a gap of 6 voxels closes (the grown cubes touch), 7 does not
    merged = _cubes((2, 2, 2), (2, 2, 12))
    apart = _cubes((2, 2, 2), (2, 2, 13))
    first = _cubes((2, 2, 2))
    one = lesionwise(first, merged, (1.0, 1.0, 1.0))
    assert [(lesion.voxels, lesion.components) for lesion in one.lesions] == [(128, (1,))]
    assert one.dice == pytest.approx(2 * 64 / (64 + 128))
    assert one.hd95 == pytest.approx(hd95_surfels(first, merged, (1.0, 1.0, 1.0)))
    two = lesionwise(first, apart, (1.0, 1.0, 1.0))
    assert [(lesion.voxels, lesion.components) for lesion in two.lesions] == [(64, (1,)), (64, ())]
    assert two.dice == pytest.approx(0.5) and two.hd95 == pytest.approx(PENALTY / 2)
    assert lesionwise(merged, merged, (1.0, 1.0, 1.0)).dice == 1.0


def test_one_component_counts_for_two_lesions():
    ref = _cubes((2, 2, 2), (2, 2, 20))
    bar = np.zeros_like(ref)
    bar[2:6, 2:6, 2:24] = True  # covers both cubes and the gap: 4 × 4 × 22 = 352 voxels
    result = lesionwise(bar, ref, (1.0, 1.0, 1.0))
    assert [lesion.components for lesion in result.lesions] == [(1,), (1,)]
    assert result.false_positives == ()
    assert result.dice == pytest.approx(2 * 64 / (64 + 352))


def test_lesions_at_or_below_the_volume_threshold_are_ignored_in_mm3():
    big, small = _cubes((2, 2, 2)), _cubes((20, 20, 20), edge=3)  # 64 and 27 voxels
    ref = big | small
    result = lesionwise(big, ref, (1.0, 1.0, 1.0))  # the small lesion is missed but not scored
    assert [lesion.scored for lesion in result.lesions] == [True, False]
    assert result.dice == 1.0 and result.hd95 == 0.0
    matched_small = lesionwise(ref, ref, (1.0, 1.0, 1.0))  # its component is no false positive either
    assert matched_small.false_positives == () and matched_small.dice == 1.0
    # 27 voxels of 2 mm³ = 54 mm³ > 50: scored, and missed
    anisotropic = lesionwise(big, ref, (2.0, 1.0, 1.0))
    assert anisotropic.lesions[1].volume_mm3 == pytest.approx(54.0) and anisotropic.lesions[1].scored
    assert anisotropic.dice == pytest.approx(0.5) and anisotropic.hd95 == pytest.approx(PENALTY / 2)
    slab = np.zeros_like(ref)
    slab[20, 20:25, 20:25] = True  # 25 voxels of 2 mm³ = 50 mm³: at the threshold, ignored
    assert lesionwise(big, big | slab, (2.0, 1.0, 1.0)).dice == 1.0


def test_lesionwise_empty_masks():
    empty = np.zeros((20, 20, 20), dtype=bool)
    cube = _cubes((2, 2, 2), shape=(20, 20, 20))
    both_empty = lesionwise(empty, empty, (1.0, 1.0, 1.0))
    assert (both_empty.dice, both_empty.hd95, both_empty.lesions, both_empty.false_positives) == (1.0, 0.0, (), ())
    nan = lesionwise(empty, empty, (1.0, 1.0, 1.0), empty_policy="nan")
    assert math.isnan(nan.dice) and math.isnan(nan.hd95)
    only_pred = lesionwise(cube, empty, (1.0, 1.0, 1.0))
    assert (only_pred.dice, only_pred.hd95, len(only_pred.false_positives)) == (0.0, PENALTY, 1)
    only_ref = lesionwise(empty, cube, (1.0, 1.0, 1.0))
    assert (only_ref.dice, only_ref.hd95, len(only_ref.lesions)) == (0.0, PENALTY, 1)
    with pytest.raises(ValueError, match="3D"):
        lesionwise(empty[0], empty[0], (1.0, 1.0))
