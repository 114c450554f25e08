"""Write the built-in synthetic BraTS-like demo dataset as an nnU-Net raw dataset.

Looks like MSD Task01 after region conversion: 4 channels (FLAIR, T1w, T1gd, T2w), labels
0 background / 1 edema / 2 non-enhancing core / 3 enhancing tumour, nested irregular tumours on a
brain-like background, region dataset.json (whole tumor, tumor core, enhancing tumor). Besides
imagesTr/labelsTr it writes a labeled held-out test split (imagesTs/labelsTs) and unlabeled images
(imagesUnlabeled). Deterministic for a given seed; case ids are unique across all splits.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import binary_erosion, gaussian_filter

CHANNELS = {"0": "FLAIR", "1": "T1w", "2": "T1gd", "3": "T2w"}
REGION_LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
# intensity offsets of edema, non-enhancing core, enhancing tumour per channel (FLAIR, T1w, T1gd, T2w)
TISSUE_CONTRAST = np.array([[0.9, -0.2, -0.1, 0.7],
                            [0.5, -0.5, -0.4, 0.9],
                            [0.4, -0.3, 1.1, 0.3]])
DEFAULT_DATASET_ID = 990
DEFAULT_NAME = "BraTSDemo"
VARIETY_NAME = "BraTSVariety"
# (z, y, x); the CPU planners plan a 48 x 48 x 64 patch for it: 64 voxels along x give CPC its 3-position
# prediction axis (context and targets apart), 48 on the others hold its 32-voxel sub-patches
DEFAULT_SHAPE = (52, 52, 72)


def _irregular_blob(rng: np.random.RandomState, shape: Sequence[int], center: np.ndarray,
                    radius: float | Sequence[float], roughness: float = 0.35) -> np.ndarray:
    """A star-shaped blob: a sphere (an ellipsoid for one radius per axis) whose radius is modulated by smooth
    noise."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), 0).astype(np.float32)
    radii = np.broadcast_to(np.asarray(radius, dtype=np.float32), (len(shape),)).reshape(-1, 1, 1, 1)
    dist = np.sqrt((((grid - center.reshape(-1, 1, 1, 1)) / radii) ** 2).sum(0))
    noise = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=3)
    noise /= np.abs(noise).max() + 1e-8
    return dist < 1 + roughness * noise


def make_case(rng: np.random.RandomState, shape: Sequence[int], with_enhancing: bool = True,
              variety: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One case: image (4, *shape) float32 and label map (*shape) uint8 with nested tumour labels.

    ``variety`` draws what a few cases cannot show: brains of other sizes and positions, one to three
    tumours of any size anywhere in the brain, per-case (site) tissue contrast, a smooth bias field and
    another noise level.
    """
    shape = tuple(int(s) for s in shape)
    extent = np.array(shape, dtype=np.float32)
    if variety:
        center = extent / 2 + rng.uniform(-0.06, 0.06, 3) * extent
        brain = _irregular_blob(rng, shape, center, rng.uniform(0.36, 0.47, 3) * extent, roughness=0.1)
    else:
        center = extent / 2 + rng.uniform(-1.5, 1.5, 3)
        brain = _irregular_blob(rng, shape, center, 0.45 * extent, roughness=0.06)  # fills each axis
    ventricles = _irregular_blob(rng, shape, center + rng.uniform(-2, 2, 3), 0.1 * min(shape), 0.3)

    label = np.zeros(shape, np.uint8)
    for _ in range(rng.randint(1, 4) if variety else 1):
        tumour_center = center + rng.uniform(-0.25 if variety else -0.18, 0.25 if variety else 0.18, 3) * extent
        size = rng.uniform(0.08, 0.28) if variety else rng.uniform(0.16, 0.24)
        whole = _irregular_blob(rng, shape, tumour_center, size * min(shape)) & brain
        core_size = size * rng.uniform(0.3, 0.7) if variety else rng.uniform(0.08, 0.13)
        core = _irregular_blob(rng, shape, tumour_center, core_size * min(shape)) & whole
        label[whole & (label == 0)] = 1
        label[core] = 2
        if with_enhancing:
            label[core & ~binary_erosion(core, iterations=2)] = 3

    contrast = TISSUE_CONTRAST * (rng.uniform(0.5, 1.5, TISSUE_CONTRAST.shape) if variety else 1)
    bias = 1.0
    if variety:  # smooth multiplicative field, about ±15 % (one standard deviation)
        field = gaussian_filter(rng.standard_normal(shape), 12)
        bias = 1 + 0.15 * field / field.std()
    noise = rng.uniform(0.04, 0.16) if variety else 0.08
    image = np.zeros((4, *shape), np.float32)
    texture = gaussian_filter(rng.standard_normal(shape), sigma=4)
    tissue = 1.0 + 0.1 * texture / texture.std()
    for c in range(4):
        channel = np.where(brain, tissue * rng.uniform(0.8, 1.2), 0.0)
        channel[ventricles & brain] -= 0.4 if c in (0, 1, 2) else -0.6
        for lab in (1, 2, 3):
            channel[label == lab] += contrast[lab - 1, c]
        channel = gaussian_filter(channel * bias, sigma=0.7) + rng.normal(0, noise, shape)
        scale = rng.uniform(50, 150)  # scanner-dependent intensity scale: normalisation must handle it
        image[c] = np.where(brain, channel, 0.0) * scale
    return image.astype(np.float32), label


def _write(array: np.ndarray, path: str, spacing: Sequence[float]) -> None:
    """Write a (z, y, x)-ordered array as NIfTI with the given spacing (x, y, z order for SimpleITK)."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing([float(s) for s in spacing][::-1])
    sitk.WriteImage(img, path, useCompression=True)


MIN_TRAIN = 5  # nnU-Net's default split is 5 folds, one case per fold at least
MIN_EDGE = 16  # voxels per axis; smaller volumes leave no room for a tumour


def check_arguments(dataset_id: int, num_train: int, num_test: int, num_unlabeled: int, shape: Sequence[int],
                    spacing: Sequence[float], seed: int) -> None:
    """Raise ValueError naming the first argument that would fail later (or write a useless dataset)."""
    problems = [
        (not 1 <= dataset_id <= 999, f"-d must lie in 1..999, got {dataset_id}"),
        (num_train < MIN_TRAIN, f"--num-train must be >= {MIN_TRAIN} (nnU-Net's 5-fold split needs a case per "
                                f"fold), got {num_train}"),
        (num_test < 0, f"--num-test must be >= 0, got {num_test}"),
        (num_unlabeled < 0, f"--num-unlabeled must be >= 0, got {num_unlabeled}"),
        (len(shape) != 3 or min(shape) < MIN_EDGE, f"--shape needs 3 sizes >= {MIN_EDGE} voxels (Z Y X), got "
                                                   f"{' '.join(map(str, shape))}"),
        (len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0,
         f"--spacing needs 3 positive sizes in mm (Z Y X), got {' '.join(map(str, spacing))}"),
        (not 0 <= seed < 2**32, f"--seed must lie in 0..2**32-1, got {seed}"),
    ]
    for failed, message in problems:
        if failed:
            raise ValueError(f"{message}.")


def make_demo_dataset(dataset_id: int = DEFAULT_DATASET_ID, raw_folder: str | None = None,
                      num_train: int = 20, num_test: int = 8, num_unlabeled: int = 16,
                      shape: Sequence[int] = DEFAULT_SHAPE, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                      seed: int = 0, overwrite: bool = False, verbose: bool = True, variety: bool = False) -> str:
    """Write the demo dataset into ``raw_folder`` (default ``$nnUNet_raw``); return its folder.

    ``variety``: cases as :func:`make_case` draws them with ``variety`` (dataset name ``BraTSVariety``)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    raw_folder = raw_folder or os.environ.get("nnUNet_raw")
    if not raw_folder:
        raise ValueError("No raw folder: set nnUNet_raw or pass raw_folder / --raw.")
    check_arguments(dataset_id, num_train, num_test, num_unlabeled, shape, spacing, seed)
    name = VARIETY_NAME if variety else DEFAULT_NAME
    folder = os.path.join(raw_folder, f"Dataset{dataset_id:03d}_{name}")
    if os.path.exists(folder) and os.listdir(folder):
        if not overwrite:
            raise FileExistsError(f"{folder} exists and is not empty; pass --overwrite to replace it.")
        shutil.rmtree(folder)
    splits = {"imagesTr": num_train, "imagesTs": num_test, "imagesUnlabeled": num_unlabeled}
    rng = np.random.RandomState(seed)
    case = 0
    for split, count in splits.items():
        os.makedirs(os.path.join(folder, split), exist_ok=True)
        label_folder = {"imagesTr": "labelsTr", "imagesTs": "labelsTs"}.get(split)
        if label_folder:
            os.makedirs(os.path.join(folder, label_folder), exist_ok=True)
        for _ in range(count):
            case_rng = np.random.RandomState(rng.randint(2**31))
            image, label = make_case(case_rng, shape, with_enhancing=case_rng.uniform() > 0.1, variety=variety)
            case_id = f"DEMO_{case:03d}"
            for c in range(image.shape[0]):
                _write(image[c], os.path.join(folder, split, f"{case_id}_{c:04d}.nii.gz"), spacing)
            if label_folder:
                _write(label, os.path.join(folder, label_folder, f"{case_id}.nii.gz"), spacing)
            case += 1
        if verbose:
            print(f"[make-demo-dataset] wrote {count} cases to {split}")
    generate_dataset_json(folder, CHANNELS, REGION_LABELS, num_train, ".nii.gz", regions_class_order=(1, 2, 3),
                          dataset_name=f"Dataset{dataset_id:03d}_{name}",
                          description="nnunet_ext synthetic BraTS-like demo data (labels as MSD Task01)",
                          shape=list(shape), seed=seed, num_test=num_test, num_unlabeled=num_unlabeled,
                          variety=variety)
    return folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sizes and counts are configurable; defaults give a ~1 s per case dataset."""
    parser.add_argument("-d", type=int, default=DEFAULT_DATASET_ID, help="dataset id (default %(default)s)")
    parser.add_argument("--raw", default=None, help="raw folder (default: $nnUNet_raw)")
    parser.add_argument("--num-train", type=int, default=20)
    parser.add_argument("--num-test", type=int, default=8)
    parser.add_argument("--num-unlabeled", type=int, default=16)
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("Z", "Y", "X"))
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0], metavar=("Z", "Y", "X"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    parser.add_argument("--variety", action="store_true",
                        help="more anatomical, tumour and scanner variety than a few cases show (BraTSVariety)")


def run(args: argparse.Namespace) -> int:
    """Write the dataset and print where it went."""
    folder = make_demo_dataset(args.d, args.raw, args.num_train, args.num_test, args.num_unlabeled,
                               args.shape, args.spacing, args.seed, args.overwrite, variety=args.variety)
    print(f"[make-demo-dataset] dataset written to {folder}")
    return 0
