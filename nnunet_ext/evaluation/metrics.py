"""Dice, HD95 and normalized surface Dice (NSD) of binary masks, with a named policy for empty masks.

Shapes: ``pred`` and ``ref`` are boolean arrays of the same shape (D spatial axes, e.g. (z, y, x));
``spacing`` has D entries in millimetres, in the *array's* axis order (for a SimpleITK image read with
``GetArrayFromImage`` that is ``image.GetSpacing()[::-1]``). Every function returns one float per pair
of masks (no batch or channel axis, no reduction).

Dice: ``2|P∩R| / (|P| + |R|)``.

HD95 (in mm): the surface of a mask is the mask minus its binary erosion with the face-connected
structuring element (``connectivity=1``: 6 neighbours in 3D; ``connectivity=D``: full 26-neighbourhood);
voxels on the image border count as surface (erosion with border value 0). For every surface voxel of
one mask, the distance to the nearest surface voxel of the other mask is the exact Euclidean distance
with the voxel spacing (``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``).
HD95 = max(P95(pred→ref), P95(ref→pred)), percentiles by ``numpy.percentile`` (linear interpolation).
This is the "max of directed 95th percentiles" of MONAI's ``compute_hausdorff_distance(percentile=95)``;
MedPy's ``hd95`` (same surfaces) instead takes the 95th percentile of both directions pooled.

``hd95_surfels`` and ``nsd`` (3D only) weight surface elements by their area instead of counting voxels, as
DeepMind's surface-distance code does, which the BraTS 2023 metrics and MSD use (:mod:`.surfaces`). NSD at
tolerance τ mm: the fraction of both surfaces' area within τ of the other surface.

Empty-mask policies (``empty_policy``):

- ``"brats"`` (BraTS challenge convention, default): both empty → Dice 1, HD95 0; exactly one empty →
  Dice 0, HD95 = image diagonal ``sqrt(Σ (shape_i · spacing_i)²)`` (373.13 mm for 240×240×155 at 1 mm).
- ``"nan"`` (nnU-Net convention): both empty → Dice NaN, HD95 NaN; exactly one empty → Dice 0, HD95 NaN.

NSD follows Dice under both policies (both empty: 1 or NaN; exactly one empty: 0).
"""

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from nnunet_ext.evaluation.surfaces import robust_hausdorff, surface_dice, surfel_distances

EMPTY_POLICIES = ("brats", "nan")

EMPTY_POLICY_DESCRIPTIONS = {
    "brats": "both masks empty: Dice 1, HD95 0; exactly one empty: Dice 0, HD95 = image diagonal "
    "sqrt(sum((shape_i * spacing_i)^2)) in mm (373.13 for 240x240x155 at 1 mm)",
    "nan": "both masks empty: Dice NaN, HD95 NaN; exactly one empty: Dice 0, HD95 NaN (nnU-Net convention)",
}

DICE_CONVENTION = "2|P and R| / (|P| + |R|) of binary region masks"

HD95_CONVENTION = (
    "max(P95 of distances pred surface -> ref surface, P95 of ref surface -> pred surface) in mm; surface = "
    "mask minus its binary erosion (face connectivity, 6 neighbours in 3D; image border counts as outside); "
    "exact Euclidean distance transform with the image spacing; numpy.percentile with linear interpolation"
)


def check_policy(empty_policy: str) -> None:
    """Raise ValueError for an unknown empty-mask policy."""
    if empty_policy not in EMPTY_POLICIES:
        raise ValueError(f"empty_policy must be one of {EMPTY_POLICIES}, got {empty_policy!r}")


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> None:
    """Raise ValueError if the two masks differ in shape."""
    if pred.shape != ref.shape:
        raise ValueError(f"prediction and reference masks differ in shape: {pred.shape} vs {ref.shape}")


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Return the diagonal of an image of ``shape`` voxels of ``spacing`` mm: sqrt(Σ (shape_i·spacing_i)²)."""
    extent = np.asarray(shape, dtype=float) * np.asarray(spacing, dtype=float)
    return float(np.sqrt(np.sum(extent**2)))


def dice(pred: np.ndarray, ref: np.ndarray, empty_policy: str = "brats") -> float:
    """Return the Dice coefficient of two boolean masks of the same shape."""
    check_policy(empty_policy)
    _check_pair(pred, ref)
    pred, ref = pred.astype(bool), ref.astype(bool)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return 1.0 if empty_policy == "brats" else float("nan")
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def surface(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Return the surface voxels of a boolean mask: the mask minus its erosion (image border is outside)."""
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _crop_to_union(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus one voxel, clipped to the image."""
    coords = np.argwhere(pred | ref)
    lower = np.maximum(coords.min(axis=0) - 1, 0)
    upper = np.minimum(coords.max(axis=0) + 2, pred.shape)
    box = tuple(slice(lo, hi) for lo, hi in zip(lower, upper, strict=True))
    return pred[box], ref[box]


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], connectivity: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Return the distances (mm) from each surface voxel of ``pred`` to the nearest one of ``ref``, and back.

    Both masks must be non-empty. Each result is 1-D, one entry per surface voxel of the source mask.
    The masks are cropped and their surfaces computed once for both directions.
    """
    pred, ref = _crop_to_union(pred.astype(bool), ref.astype(bool))
    sampling = np.asarray(spacing, dtype=float)
    pred_surface, ref_surface = surface(pred, connectivity), surface(ref, connectivity)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)
    return to_ref[pred_surface], to_pred[ref_surface]


def _check_distance_arguments(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], empty_policy: str) -> None:
    """Raise ValueError for an unknown policy, masks of different shapes, or a spacing of another dimension."""
    check_policy(empty_policy)
    _check_pair(pred, ref)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} needs one entry per mask axis ({pred.ndim})")


def _empty_distance(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], empty_policy: str) -> float:
    """Return the HD95 the policy gives when a mask is empty (0, image diagonal or NaN)."""
    if empty_policy == "nan":
        return float("nan")
    return 0.0 if not pred.any() and not ref.any() else image_diagonal_mm(pred.shape, spacing)


def hd95(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    empty_policy: str = "brats",
    connectivity: int = 1,
) -> float:
    """Return the 95th-percentile Hausdorff distance (mm) of two boolean masks (see module docstring)."""
    _check_distance_arguments(pred, ref, spacing, empty_policy)
    if not pred.any() or not ref.any():
        return _empty_distance(pred, ref, spacing, empty_policy)
    forward, backward = surface_distances(pred, ref, spacing, connectivity)
    return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))


def hd95_surfels(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], empty_policy: str = "brats") -> float:
    """Return the HD95 (mm) of two boolean 3D masks with surface elements weighted by area (challenge code)."""
    _check_distance_arguments(pred, ref, spacing, empty_policy)
    if not pred.any() or not ref.any():
        return _empty_distance(pred, ref, spacing, empty_policy)
    return robust_hausdorff(surfel_distances(pred, ref, tuple(spacing)), 95.0)


def nsd(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = 1.0,
    empty_policy: str = "brats",
) -> float:
    """Return the normalized surface Dice of two boolean 3D masks at ``tolerance_mm`` (area-weighted surfels)."""
    _check_distance_arguments(pred, ref, spacing, empty_policy)
    if not pred.any() or not ref.any():
        return dice(pred, ref, empty_policy)
    return surface_dice(surfel_distances(pred, ref, tuple(spacing)), tolerance_mm)
