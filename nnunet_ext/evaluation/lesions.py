"""Lesion-wise Dice and HD95 of one region, as the BraTS 2023 challenge ranks segmentations.

Shapes: ``pred`` and ``ref`` are 3D boolean masks of one region (e.g. whole tumour) of the same shape;
``spacing`` has 3 entries in mm in the *array's* axis order (as in :mod:`nnunet_ext.evaluation.metrics`).

Definition (the BraTS 2023 lesion-wise metrics, ``rachitsaluja/BraTS-2023-Metrics``, ``metrics.py``):

1. Lesions: the reference is dilated ``dilation_iterations`` times with the 18-neighbour structure
   (``generate_binary_structure(3, 2)``, image border outside) and the dilated mask split into 26-connected
   components; lesion k is the set of reference voxels inside component k, so reference components within one
   dilated component form one lesion. Its id is the component's label (raster order, as ``cc3d`` numbers).
2. Predicted components: 26-connected components of the prediction. Every component with a voxel inside the
   dilated lesion counts for that lesion (a component may count for several lesions).
3. Per lesion: Dice and HD95 of the lesion against the union of its components, HD95 with surface elements
   weighted by area (:func:`.surfaces.robust_hausdorff`, the challenge's DeepMind code). A lesion without a
   component scores Dice 0 and HD95 = ``hd95_penalty_mm``.
4. Lesions of volume <= ``max_ignored_volume_mm3`` (voxels × voxel volume) are ignored: not scored, but their
   components are not false positives either.
5. False positives: predicted components that count for no lesion (ignored ones included); each scores
   Dice 0 and HD95 = ``hd95_penalty_mm``.
6. Case score: the sum over the scored lesions and false positives divided by their number. With none of either
   (e.g. both masks empty) the empty-mask policy decides: ``"brats"`` Dice 1, HD95 0; ``"nan"`` NaN, NaN.
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from nnunet_ext.evaluation.metrics import check_policy, dice
from nnunet_ext.evaluation.surfaces import robust_hausdorff, surfel_distances

FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26 neighbours


@dataclass(frozen=True)
class LesionwiseParameters:
    """Dilation, size threshold and HD95 penalty of one challenge's lesion-wise metrics."""

    dilation_iterations: int
    max_ignored_volume_mm3: float
    hd95_penalty_mm: float


BRATS_2023_GLIOMA = LesionwiseParameters(dilation_iterations=3, max_ignored_volume_mm3=50.0, hd95_penalty_mm=374.0)


@dataclass(frozen=True)
class Lesion:
    """One reference lesion: its id, size, the predicted components counted for it, and its scores."""

    lesion_id: int
    voxels: int
    volume_mm3: float
    components: tuple[int, ...]
    dice: float
    hd95: float
    scored: bool


@dataclass(frozen=True)
class FalsePositive:
    """A predicted component that counts for no reference lesion."""

    component: int
    voxels: int
    volume_mm3: float


@dataclass(frozen=True)
class LesionwiseResult:
    """The case's lesion-wise Dice and HD95 (mm) with every lesion and false positive behind them."""

    dice: float
    hd95: float
    lesions: tuple[Lesion, ...]
    false_positives: tuple[FalsePositive, ...]


def _union_box(boxes: list[tuple[slice, ...]]) -> tuple[slice, ...]:
    """The bounding box of several boxes."""
    return tuple(slice(min(b[axis].start for b in boxes), max(b[axis].stop for b in boxes)) for axis in range(3))


def _lesion(
    lesion_id: int,
    lesion: np.ndarray,
    matched: np.ndarray,
    components: tuple[int, ...],
    spacing: tuple[float, float, float],
    parameters: LesionwiseParameters,
) -> Lesion:
    """Score one reference lesion against ``matched``, the union of the predicted components counted for it."""
    voxels = int(lesion.sum())
    volume = voxels * float(np.prod(spacing))
    if components:
        scores = dice(matched, lesion), robust_hausdorff(surfel_distances(matched, lesion, spacing))
    else:
        scores = 0.0, parameters.hd95_penalty_mm
    return Lesion(lesion_id, voxels, volume, components, *scores, scored=volume > parameters.max_ignored_volume_mm3)


def lesionwise(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: tuple[float, float, float],
    parameters: LesionwiseParameters = BRATS_2023_GLIOMA,
    empty_policy: str = "brats",
) -> LesionwiseResult:
    """Return the lesion-wise Dice and HD95 of two boolean 3D masks of one region (see module docstring)."""
    check_policy(empty_policy)
    if pred.shape != ref.shape or pred.ndim != 3 or len(spacing) != 3:
        raise ValueError(f"lesion-wise metrics need 3D masks of one shape and 3 spacings, got {pred.shape}, "
                         f"{ref.shape} and {tuple(spacing)}")
    pred, ref, spacing = pred.astype(bool), ref.astype(bool), tuple(float(s) for s in spacing)
    dilated = ndimage.binary_dilation(
        ref, ndimage.generate_binary_structure(3, 2), iterations=parameters.dilation_iterations
    )
    lesion_labels, _ = ndimage.label(dilated, FULL_CONNECTIVITY)
    pred_labels, n_components = ndimage.label(pred, FULL_CONNECTIVITY)
    component_boxes = ndimage.find_objects(pred_labels)
    lesions = []
    for lesion_id, lesion_box in enumerate(ndimage.find_objects(lesion_labels), start=1):
        region = lesion_labels[lesion_box] == lesion_id
        components = tuple(int(c) for c in np.unique(pred_labels[lesion_box][region]) if c)
        box = _union_box([lesion_box, *(component_boxes[c - 1] for c in components)])  # holds lesion and matches
        lesion = ref[box] & (lesion_labels[box] == lesion_id)
        matched = np.isin(pred_labels[box], components)
        lesions.append(_lesion(lesion_id, lesion, matched, components, spacing, parameters))
    counted = {c for lesion in lesions for c in lesion.components}
    sizes = np.bincount(pred_labels.ravel(), minlength=n_components + 1)
    false_positives = tuple(
        FalsePositive(c, int(sizes[c]), int(sizes[c]) * float(np.prod(spacing)))
        for c in range(1, n_components + 1)
        if c not in counted
    )
    scored = [lesion for lesion in lesions if lesion.scored]
    count = len(scored) + len(false_positives)
    if count == 0:
        empty = (1.0, 0.0) if empty_policy == "brats" else (float("nan"), float("nan"))
        return LesionwiseResult(*empty, tuple(lesions), false_positives)
    penalty = len(false_positives) * parameters.hd95_penalty_mm
    return LesionwiseResult(
        sum(lesion.dice for lesion in scored) / count,
        (sum(lesion.hd95 for lesion in scored) + penalty) / count,
        tuple(lesions),
        false_positives,
    )
