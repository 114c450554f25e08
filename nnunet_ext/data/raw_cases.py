"""Cases of an nnU-Net raw folder: their channel files, and reading one case with every check.

``load_checked`` reads with nnU-Net's own reader (the arrays nnU-Net would preprocess) channel by channel,
so that each error names its file: complete files with finite voxels (:func:`nnunet_ext.images.check_file`),
the dataset's dimensionality, one shape and spacing for all channels (nnU-Net's reader would stop with a
bare RuntimeError) and one origin and direction (nnU-Net's reader only prints a warning; here an error, or
a warning kept with the case when misaligned channels are accepted).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np

from nnunet_ext.images import Geometry, check_file, error_text, read_geometry

# endings of the image formats nnU-Net's readers take (longest first, so .nii.gz is not taken for .gz)
IMAGE_ENDINGS = (".nii.gz", ".gipl.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".gipl", ".png", ".bmp",
                 ".tif", ".tiff", ".jpg", ".jpeg")


def raw_cases(folder: str, file_ending: str, num_channels: int) -> dict[str, list[str]]:
    """Group ``CASE_XXXX<ending>`` files by case; fail naming a case whose channel files are incomplete, or an
    image file of another format, which nnU-Net would skip without a word."""
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(file_ending)}$")
    cases: dict[str, dict[int, str]] = {}
    for f in sorted(os.listdir(folder)):
        match = pattern.match(f)
        if f.startswith("."):
            continue
        if not f.endswith(file_ending):
            _refuse_other_image_format(os.path.join(folder, f), file_ending)
            continue
        if match is None:
            raise ValueError(f"{os.path.join(folder, f)}: expected nnU-Net naming CASE_XXXX{file_ending} "
                             f"(channel index as 4 digits).")
        cases.setdefault(match.group(1), {})[int(match.group(2))] = os.path.join(folder, f)
    expected = list(range(num_channels))
    for case, channels in cases.items():
        if sorted(channels) != expected:
            raise ValueError(f"{folder}: case '{case}' has channel files {sorted(channels)}, but dataset.json "
                             f"lists {num_channels} channels (expected {case}_0000..{case}_{num_channels - 1:04d}"
                             f"{file_ending}).")
    return {case: [channels[c] for c in expected] for case, channels in cases.items()}


def _refuse_other_image_format(path: str, file_ending: str) -> None:
    """Raise ValueError when ``path`` is an image file whose ending is not the dataset's ``file_ending``."""
    other = next((e for e in IMAGE_ENDINGS if path.endswith(e)), None)
    if other is not None:
        raise ValueError(f"{path}: a {other} image in a dataset whose images end in {file_ending} (dataset.json "
                         f"file_ending); nnU-Net reads only those and would skip it without a word: convert it to "
                         f"{file_ending} or move it out of {os.path.dirname(path)}.")


def file_signature(files: list[str]) -> dict[str, list[int]]:
    """File name -> [size, mtime in ns]: tells whether a raw file changed since it was last read."""
    return {os.path.basename(f): [os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files}


@dataclass
class CheckedCase:
    """One case as nnU-Net's reader returns it (data: C, *spatial), each channel's geometry, and warnings."""

    data: np.ndarray
    properties: dict
    geometries: list[Geometry]
    warnings: list[str] = field(default_factory=list)


def load_checked(image_files: list[str], reader, dimension: int | None = None,
                 accept_misaligned: bool = False) -> CheckedCase:
    """Read one case's channels; raise ValueError naming a file that is unreadable, truncated, not finite,
    of another dimensionality than ``dimension``, or off the first channel's voxel grid.

    Channels whose origin or direction differ from the first channel's are an error unless
    ``accept_misaligned``; then the difference is kept in ``warnings``.
    """
    arrays, geometries, warnings, properties = [], [], [], None
    for f in image_files:
        check_file(f)
        geometry = read_geometry(f)
        if dimension is not None and geometry.dimension != dimension:
            raise ValueError(f"{f}: a {geometry.dimension}D image, but the dataset's images are {dimension}D "
                             f"(nnU-Net would resample it into a wrong volume); remove it or convert it to "
                             f"{dimension}D.")
        try:
            data, props = reader.read_images([f])
        except Exception as e:  # any reader failure: name the file
            raise ValueError(f"{f}: cannot be read as an image ({error_text(e)}).") from e
        if not np.isfinite(data).all():
            raise ValueError(f"{f}: contains NaN or infinite voxels; fix or remove this image.")
        if geometries:
            grid = geometry.differences(geometries[0], ("size", "spacing"))
            if grid:
                raise ValueError(f"{f}: {'; '.join(grid)} of {image_files[0]}; all channels of a case must have "
                                 f"the same shape and spacing.")
            misaligned = geometry.differences(geometries[0], ("origin", "direction"))
            if misaligned:
                message = f"{f}: {'; '.join(misaligned)} of {image_files[0]}"
                if not accept_misaligned:
                    raise ValueError(f"{message}; the channels of a case must be aligned: fix the file, or pass "
                                     f"--accept-misaligned-channels to use the case as it is.")
                warnings.append(message)
        arrays.append(data)
        geometries.append(geometry)
        properties = properties or props
    return CheckedCase(np.vstack(arrays), properties, geometries, warnings)
