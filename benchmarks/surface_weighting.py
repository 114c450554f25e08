"""How much counting surface voxels moves HD95 and NSD against area-weighted surface elements (the challenges' way).

Tumour-like shapes at BraTS's 1 mm and at an anisotropic 1 × 1 × 3 mm: a blob (an ellipsoid with a smoothed
random boundary), a rim 2 voxels thick around a core (like enhancing tumour), and a small blob of about 150
voxels. Predictions: the reference with its boundary moved by smooth random displacements of about 1 and 3
voxels, dilated by 1 voxel, and shifted by 2 voxels. For each pair it prints HD95 with voxel surfaces
(``metrics.hd95``, what ``nnunet-ext evaluate`` reports by default) and with surfels (``metrics.hd95_surfels``),
and NSD at 1 mm counting voxels (nnU-Net v1's and the BraTS 2024 scripts' way) and with surfels
(``metrics.nsd``). Deterministic (seeded); about a minute on one CPU core.

    python benchmarks/surface_weighting.py
"""

import numpy as np
from scipy import ndimage

from nnunet_ext.evaluation.metrics import hd95, hd95_surfels, nsd, surface_distances

SHAPE = (96, 96, 96)


def blob(rng: np.random.Generator, radii: tuple[float, float, float], roughness: float) -> np.ndarray:
    """An ellipsoid of ``radii`` voxels whose boundary is moved by smooth noise of about ``roughness`` voxels."""
    grid = np.indices(SHAPE, dtype=float) - np.array(SHAPE)[:, None, None, None] / 2
    radius = np.sqrt(sum((g / r) ** 2 for g, r in zip(grid, radii, strict=True))) * min(radii)
    noise = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 6)
    return radius + roughness * noise / noise.std() < min(radii)


def moved(rng: np.random.Generator, mask: np.ndarray, voxels: float) -> np.ndarray:
    """The mask with its boundary moved by smooth random displacements of about ``voxels``."""
    signed = ndimage.distance_transform_edt(~mask) - ndimage.distance_transform_edt(mask)
    noise = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 3)
    return signed + voxels * noise / noise.std() < 0


def voxel_nsd(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], tolerance_mm: float) -> float:
    """NSD counting surface voxels (face-connected surfaces, as nnU-Net v1 and the BraTS 2024 scripts)."""
    forward, backward = surface_distances(pred, ref, spacing)
    return float((np.sum(forward <= tolerance_mm) + np.sum(backward <= tolerance_mm)) / (forward.size + backward.size))


def pairs(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reference/prediction pairs by name."""
    result = {}
    shapes = {"blob": blob(rng, (30, 24, 20), 3.0), "small blob": blob(rng, (4, 3.5, 3), 0.5)}
    core = blob(rng, (26, 22, 18), 3.0)
    shapes["rim"] = ndimage.binary_dilation(core, iterations=2) & ~core
    for name, ref in shapes.items():
        result[f"{name} vs boundary moved ~1 voxel"] = ref, moved(rng, ref, 1.0)
        result[f"{name} vs boundary moved ~3 voxels"] = ref, moved(rng, ref, 3.0)
        result[f"{name} vs dilated by 1 voxel"] = ref, ndimage.binary_dilation(ref)
        result[f"{name} vs shifted by 2 voxels"] = ref, np.roll(ref, 2, axis=2)
    return result


def main() -> None:
    """Print one line per pair and spacing: HD95 voxels, HD95 surfels, NSD voxels, NSD surfels."""
    print("| pair | spacing (mm) | ref voxels | HD95 voxels | HD95 surfels | NSD@1mm voxels | NSD@1mm surfels |")
    print("|---|---|---|---|---|---|---|")
    for name, (ref, pred) in pairs(np.random.default_rng(0)).items():
        for spacing in ((1.0, 1.0, 1.0), (3.0, 1.0, 1.0)):
            print(f"| {name} | {' × '.join(f'{s:g}' for s in spacing[::-1])} | {int(ref.sum())} "
                  f"| {hd95(pred, ref, spacing):.2f} | {hd95_surfels(pred, ref, spacing):.2f} "
                  f"| {voxel_nsd(pred, ref, spacing, 1.0):.3f} | {nsd(pred, ref, spacing, 1.0):.3f} |")


if __name__ == "__main__":
    main()
