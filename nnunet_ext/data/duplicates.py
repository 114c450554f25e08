"""Copies of labeled or test images among unlabeled ones, found by content: voxels and geometry, not file bytes.

A channel's content is the SHA-1 of its voxels as nnU-Net's reader returns them (float32, with the array
shape; -0.0 counted as 0.0) together with its geometry. The same image re-compressed, saved as ``.nii``
instead of ``.nii.gz``, or with another pixel type that holds the same values has the same content. An
unlabeled case is a copy of a reference case (``imagesTr`` or ``imagesTs``) when one of its channels that is
not constant has the voxels and geometry (:class:`nnunet_ext.images.Geometry` tolerances) of one of the
reference's channels, in any channel position, or when all its channels equal the reference's. Constant
channels (e.g. an empty modality) alone do not make a copy: they carry no information about any case.

A resampled, cropped, re-oriented, rescaled or noisy copy is not identical and is not found.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections import defaultdict

import numpy as np

from nnunet_ext.data.raw_cases import file_signature, load_checked, raw_cases
from nnunet_ext.images import Geometry

REFERENCE_SPLITS = ("imagesTr", "imagesTs")
# raw content hashes of imagesTr/imagesTs, reused while a file's size and mtime are unchanged
CACHE_FILE = "raw_content_hashes.json"


def channel_contents(data: np.ndarray, geometries: list[Geometry]) -> list[dict]:
    """Per channel of ``data`` (C, *spatial): ``sha1`` of its voxels, whether it is ``informative`` (not
    constant), and its ``geometry``."""
    contents = []
    for channel, geometry in zip(data, geometries, strict=True):
        voxels = np.ascontiguousarray(channel, dtype=np.float32) + np.float32(0)  # -0.0 -> 0.0
        digest = hashlib.sha1(repr(voxels.shape).encode())
        digest.update(memoryview(voxels).cast("B"))
        contents.append({"sha1": digest.hexdigest(), "informative": bool(voxels.size and voxels.min() != voxels.max()),
                         "geometry": geometry.to_json()})
    return contents


def same_content(a: dict, b: dict) -> bool:
    """Whether two channel contents (:func:`channel_contents`) hold the same voxels on the same grid."""
    return a["sha1"] == b["sha1"] and not Geometry.from_json(a["geometry"]).differences(
        Geometry.from_json(b["geometry"]))


class ReferenceIndex:
    """Contents of the labeled (``imagesTr``) and test (``imagesTs``) cases of a raw dataset.

    ``ids``: every case id compared against (also ``labelsTs`` ids without an image), so that a check can
    tell later whether a case it did not know has appeared. ``dimension``: the spatial dimension of the
    training images (None when they mix dimensions or there are none).
    """

    def __init__(self, cases: dict[str, list[dict]], ids: set[str]):
        self.cases = cases
        self.ids = sorted(ids)
        self._by_hash: dict[str, list[tuple[str, dict]]] = defaultdict(list)
        for reference, channels in cases.items():
            for channel in channels:
                if channel["informative"]:
                    self._by_hash[channel["sha1"]].append((reference, channel))
        dimensions = {len(c[0]["geometry"]["size"]) for r, c in cases.items() if r.startswith("imagesTr/")}
        self.dimension = dimensions.pop() if len(dimensions) == 1 else None

    def copies_of(self, channels: list[dict]) -> list[str]:
        """The reference cases ('imagesTs/CASE', 'imagesTr/CASE') that ``channels`` copy (see module docstring)."""
        found = {reference for channel in channels if channel["informative"]
                 for reference, other in self._by_hash.get(channel["sha1"], []) if same_content(channel, other)}
        found |= {reference for reference, others in self.cases.items() if len(others) == len(channels)
                  and all(same_content(a, b) for a, b in zip(channels, others, strict=True))}
        return sorted(found, key=lambda r: (not r.startswith("imagesTs/"), r))


def _read_contents(files: list[str], reader_class) -> list[dict]:
    """Channel contents of one case read with nnU-Net's reader (errors name the file)."""
    case = load_checked(files, reader_class(), accept_misaligned=True)
    return channel_contents(case.data, case.geometries)


def reference_index(raw_folder: str, file_ending: str, num_channels: int, reader_class, cache_folder: str,
                    num_processes: int = 1) -> ReferenceIndex:
    """Read (or take from the cache in ``cache_folder``) the contents of every imagesTr and imagesTs case."""
    cache_path = os.path.join(cache_folder, CACHE_FILE)
    cache = {}
    if os.path.isfile(cache_path):
        with open(cache_path) as f:
            cache = json.load(f)
    reader_name = reader_class.__name__
    cases, ids, todo = {}, set(), []
    for split in REFERENCE_SPLITS:
        folder = os.path.join(raw_folder, split)
        if not os.path.isdir(folder):
            continue
        for case, files in raw_cases(folder, file_ending, num_channels).items():
            key, signature = f"{split}/{case}", file_signature(files)
            ids.add(case)
            entry = cache.get(key, {})
            if entry.get("files") == signature and entry.get("reader") == reader_name:
                cases[key] = entry["channels"]
            else:
                todo.append((key, files, signature))
    labels_ts = os.path.join(raw_folder, "labelsTs")
    if os.path.isdir(labels_ts):
        ids |= {f[:-len(file_ending)] for f in os.listdir(labels_ts) if f.endswith(file_ending)}
    if todo:
        print(f"[preprocess-unlabeled] reading {len(todo)} imagesTr/imagesTs cases to recognise copies of them "
              f"({len(cases)} known from {cache_path})", flush=True)
        jobs = [(files, reader_class) for _, files, _ in todo]
        if num_processes > 1 and len(jobs) > 1:
            with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
                contents = pool.starmap(_read_contents, jobs, chunksize=1)
        else:
            contents = [_read_contents(*job) for job in jobs]
        for (key, _, signature), channels in zip(todo, contents, strict=True):
            cases[key] = channels
            cache[key] = {"files": signature, "reader": reader_name, "channels": channels}
        cache = {k: v for k, v in cache.items() if k in cases}
        os.makedirs(cache_folder, exist_ok=True)
        with open(cache_path + ".tmp", "w") as f:
            json.dump(cache, f)
        os.replace(cache_path + ".tmp", cache_path)
    return ReferenceIndex(cases, ids)
