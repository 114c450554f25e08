"""Reading image files without silent damage: the checks every reader of ours makes, in one place.

SimpleITK, and with it nnU-Net's ``SimpleITKIO``, reads a truncated NIfTI or GIPL file as if the missing
voxels were 0, and NaN or infinite NIfTI voxels as 0, without a word. ``check_file`` finds both: NIfTI files
are read once more with nibabel, which fails on a short stream or file; a GIPL file must hold as many bytes
as its header describes. Other formats (MetaImage, NRRD) make SimpleITK itself fail when they are short, and
``read_image`` turns any reader failure into an error that names the file.

``Geometry`` is where voxels lie in space (SimpleITK's x, y, z order); two geometries match when their size
is equal, their spacings agree within ``SPACING_RTOL`` (relative), their origins within ``ORIGIN_ATOL_VOXELS``
of the smallest spacing, and their direction cosines within ``DIRECTION_ATOL``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SPACING_RTOL = 1e-4
ORIGIN_ATOL_VOXELS = 1e-3
DIRECTION_ATOL = 1e-4
NIFTI_ENDINGS = (".nii", ".nii.gz")
GIPL_HEADER_BYTES = 256
GEOMETRY_FIELDS = ("size", "spacing", "origin", "direction")


def check_file(path: str | Path) -> None:
    """Raise ValueError naming ``path`` when it is truncated, damaged, or has NaN/inf voxels a reader would hide."""
    path = str(path)
    if path.endswith(NIFTI_ENDINGS):
        _check_nifti(path)
    elif path.endswith(".gipl"):
        _check_gipl(path)


def error_text(error: Exception, limit: int = 200) -> str:
    """``Type: message`` of a library's exception on one line (ITK's span several), at most ``limit`` characters."""
    text = f"{type(error).__name__}: {' '.join(str(error).split())}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _damaged(path: str, error: Exception) -> ValueError:
    """The error for a file that cannot be read completely."""
    return ValueError(f"{path}: truncated or damaged file ({error_text(error)}); copy or export it again.")


def _check_nifti(path: str) -> None:
    """Read every voxel with nibabel (it fails where SimpleITK fills in zeros) and check they are finite."""
    import nibabel

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        data = nibabel.load(path).dataobj.get_unscaled()
    except Exception as error:  # EOFError, OSError, zlib.error, ImageFileError: all mean the file is unusable
        raise _damaged(path, error) from error
    if data.dtype.kind in "fc" and not np.isfinite(data).all():
        raise ValueError(f"{path}: contains NaN or infinite voxels (SimpleITK reads them as 0); fix or remove "
                         f"this image.")


def _check_gipl(path: str) -> None:
    """A GIPL file is a 256-byte header and the voxels; SimpleITK zero-fills a short one."""
    image = _read_sitk(path)
    expected = GIPL_HEADER_BYTES + sitk.GetArrayViewFromImage(image).nbytes
    if os.path.getsize(path) < expected:
        raise ValueError(f"{path}: truncated file ({os.path.getsize(path)} bytes, its header describes "
                         f"{expected}); copy or export it again.")


def _read_sitk(path: str) -> sitk.Image:
    """``sitk.ReadImage`` whose failures name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return sitk.ReadImage(path)
    except RuntimeError as error:
        raise _damaged(path, error) from error


def read_image(path: str | Path) -> sitk.Image:
    """Read an image with SimpleITK after :func:`check_file`; every failure names the file."""
    check_file(path)
    return _read_sitk(str(path))


@dataclass(frozen=True)
class Geometry:
    """Where an image's voxels lie: size, spacing, origin and direction, in SimpleITK's (x, y, z) order."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image | sitk.ImageFileReader) -> Geometry:
        """The geometry of a SimpleITK image (or of a reader that has read the image information)."""
        return cls(tuple(int(s) for s in image.GetSize()), tuple(float(s) for s in image.GetSpacing()),
                   tuple(float(o) for o in image.GetOrigin()), tuple(float(d) for d in image.GetDirection()))

    @classmethod
    def from_json(cls, content: dict) -> Geometry:
        """Inverse of :meth:`to_json`."""
        return cls(*(tuple(content[k]) for k in ("size", "spacing", "origin", "direction")))

    def to_json(self) -> dict:
        """A JSON-friendly dict of lists."""
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    @property
    def dimension(self) -> int:
        """Number of spatial axes."""
        return len(self.size)

    def differences(self, other: Geometry, fields: tuple[str, ...] = GEOMETRY_FIELDS) -> list[str]:
        """What of ``fields`` differs beyond the tolerances, e.g. ``['origin (0, 0, 0) vs (0, 0, 5)']``."""
        if self.dimension != other.dimension:
            return [f"dimension {self.dimension}D vs {other.dimension}D"]
        origin_atol = ORIGIN_ATOL_VOXELS * min(self.spacing + other.spacing)
        same = {"size": lambda: self.size == other.size,
                "spacing": lambda: np.allclose(self.spacing, other.spacing, rtol=SPACING_RTOL, atol=0),
                "origin": lambda: np.allclose(self.origin, other.origin, rtol=0, atol=origin_atol),
                "direction": lambda: np.allclose(self.direction, other.direction, rtol=0, atol=DIRECTION_ATOL)}
        return [f"{name} {_short(getattr(self, name))} vs {_short(getattr(other, name))}"
                for name in fields if not same[name]()]


def _short(values: tuple) -> str:
    """A tuple with at most 6 significant digits per number (and no -0)."""
    return "(" + ", ".join(f"{v + 0.0:.6g}" for v in values) + ")"


def read_geometry(path: str | Path) -> Geometry:
    """The geometry in a file's header (the voxels are not read); failures name the file."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise _damaged(str(path), error) from error
    return Geometry.of(reader)
