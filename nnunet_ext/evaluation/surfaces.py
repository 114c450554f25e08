"""Surface distances weighted by surface-element area: HD95 and normalized surface Dice as the challenges compute them.

Shapes: ``pred`` and ``ref`` are 3D boolean arrays of the same shape; ``spacing`` has 3 entries in mm in the
*array's* axis order (as in :mod:`nnunet_ext.evaluation.metrics`). Functions here take non-empty masks; the
empty-mask policies live in ``metrics``.

Surface elements ("surfels"): every 2×2×2 cell of voxel centres (corners at voxels i-1 and i along each axis,
voxels outside the image count as outside the mask) whose corners are neither all inside nor all outside
holds one surfel, placed at the cell's centre. Its area (mm²) is that of the marching-cubes triangles of the
cell at level 0.5 (vertices at edge midpoints), with the voxel spacing applied to the vertices; a cell with more
than four corners inside has the surface of its complement (Lorensen and Cline's rule). The distance
of a surfel to the other mask is the exact Euclidean distance (mm) from its cell centre to the nearest
surfel cell of the other mask (``scipy.ndimage.distance_transform_edt`` on the cell grid).

HD95: per direction, the smallest surfel distance d such that the surfels at distance <= d hold at least 95 %
of the surface area (no interpolation); the larger of the two directions. NSD at tolerance τ mm:
(area of pred surfels within τ of ref + area of ref surfels within τ of pred) / (area of both surfaces).

This is the computation of DeepMind's ``surface-distance`` package (Nikolov et al., 2021, "Clinically
applicable segmentation of head and neck anatomy for radiotherapy"), which the BraTS 2023 lesion-wise metrics
vendor for HD95 and the Medical Segmentation Decathlon used for NSD. The cell-area table is derived here
from scikit-image's marching cubes (Lorensen's table) rather than copied; it equals DeepMind's for all 256
cells (``docs/metrics.md``).
"""

from dataclasses import dataclass
from functools import cache
from itertools import product

import numpy as np
from scipy import ndimage
from skimage.measure import marching_cubes

CORNERS = tuple(product((0, 1), repeat=3))  # corner (a, b, c) of a cell carries bit 4a + 2b + c of its code


@dataclass(frozen=True)
class SurfelDistances:
    """Per surfel of each mask: its distance (mm) to the other mask's surface and its area (mm²)."""

    pred_to_ref: np.ndarray
    pred_areas: np.ndarray
    ref_to_pred: np.ndarray
    ref_areas: np.ndarray


@cache
def _cell_triangles() -> tuple[np.ndarray, ...]:
    """Marching-cubes triangles (k, 3 vertices, 3 axes; unit voxels) of each of the 256 cell codes."""
    triangles = []
    for code in range(256):
        inside = code if code.bit_count() <= 4 else 255 - code  # more than 4 corners inside: the complement
        cell = np.array([(inside >> (4 * a + 2 * b + c)) & 1 for a, b, c in CORNERS], dtype=float).reshape(2, 2, 2)
        if not cell.any():
            triangles.append(np.zeros((0, 3, 3)))
            continue
        vertices, faces, _, _ = marching_cubes(cell, level=0.5, method="lorensen", allow_degenerate=False)
        triangles.append(vertices[faces])
    return tuple(triangles)


def cell_area_table(spacing: tuple[float, float, float]) -> np.ndarray:
    """Return the surfel area (mm²) of each of the 256 cell codes for voxels of ``spacing`` mm."""
    scale = np.asarray(spacing, dtype=float)
    areas = np.zeros(256)
    for code, triangles in enumerate(_cell_triangles()):
        scaled = triangles * scale
        normals = np.cross(scaled[:, 1] - scaled[:, 0], scaled[:, 2] - scaled[:, 0])
        areas[code] = 0.5 * np.linalg.norm(normals, axis=1).sum()
    return areas


def cell_codes(mask: np.ndarray) -> np.ndarray:
    """Return the code of every cell touching ``mask``: shape ``mask.shape + 1``, cell i spans voxels i-1 and i."""
    padded = np.pad(mask.astype(np.uint8), 1)
    cells = tuple(slice(None, n + 1) for n in mask.shape)
    codes = np.zeros(tuple(n + 1 for n in mask.shape), dtype=np.uint8)
    for a, b, c in CORNERS:
        shifted = padded[a:, b:, c:][cells]
        codes |= shifted << np.uint8(4 * a + 2 * b + c)
    return codes


def _crop_to_union(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union (cells outside it have code 0)."""
    box = ndimage.find_objects((pred | ref).astype(np.uint8))[0]
    return pred[box], ref[box]


def surfel_distances(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float]) -> SurfelDistances:
    """Return the distances and areas of the surfels of two non-empty 3D masks (see module docstring)."""
    if pred.ndim != 3 or len(spacing) != 3:
        raise ValueError(f"surfels need 3D masks and 3 spacings, got shape {pred.shape} and spacing {tuple(spacing)}")
    pred, ref = _crop_to_union(pred.astype(bool), ref.astype(bool))
    areas = cell_area_table(tuple(float(s) for s in spacing))
    pred_codes, ref_codes = cell_codes(pred), cell_codes(ref)
    pred_surfels = (pred_codes != 0) & (pred_codes != 255)
    ref_surfels = (ref_codes != 0) & (ref_codes != 255)
    to_ref = ndimage.distance_transform_edt(~ref_surfels, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surfels, sampling=spacing)
    return SurfelDistances(
        to_ref[pred_surfels], areas[pred_codes[pred_surfels]], to_pred[ref_surfels], areas[ref_codes[ref_surfels]]
    )


def area_percentile(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    """Return the smallest distance whose surfels, with all nearer ones, hold ``percent`` % of the area."""
    order = np.argsort(distances, kind="stable")
    cumulative = np.cumsum(areas[order]) / areas.sum()
    index = min(int(np.searchsorted(cumulative, percent / 100.0)), len(distances) - 1)
    return float(distances[order][index])


def robust_hausdorff(surfels: SurfelDistances, percent: float = 95.0) -> float:
    """Return the larger of the two directed area-weighted ``percent`` percentiles of surfel distances (mm)."""
    return max(
        area_percentile(surfels.pred_to_ref, surfels.pred_areas, percent),
        area_percentile(surfels.ref_to_pred, surfels.ref_areas, percent),
    )


def surface_dice(surfels: SurfelDistances, tolerance_mm: float) -> float:
    """Return the fraction of both surfaces' area that lies within ``tolerance_mm`` of the other surface."""
    within = surfels.pred_areas[surfels.pred_to_ref <= tolerance_mm].sum()
    within += surfels.ref_areas[surfels.ref_to_pred <= tolerance_mm].sum()
    return float(within / (surfels.pred_areas.sum() + surfels.ref_areas.sum()))
