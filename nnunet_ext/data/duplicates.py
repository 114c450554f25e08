"""Copies of labeled or test images among unlabeled ones, found by their voxels, whatever the file or its header.

A channel's content is its voxels as nnU-Net's reader returns them (float32; -0.0 counted as 0.0): ``sha1``
of the array as read (with its shape) and ``sha1_any_orientation``, the SHA-1 of the array in a canonical
orientation among its axis flips and transpositions (:func:`orientation_free_sha1`), so that the voxels of an
image whose direction cosines were edited, which a reorienting reader returns flipped or transposed, still
match. Its geometry (:class:`nnunet_ext.images.Geometry`) is kept beside it. The same image re-compressed,
saved as ``.nii`` instead of ``.nii.gz``, with another pixel type that holds the same values, or with another
origin, spacing or direction in its header has the same voxels.

An unlabeled case is a copy of a reference case (``imagesTr`` or ``imagesTs``) when one of its channels that
is not constant has the voxels of one of the reference's channels, in any channel position and whatever either
header says, or when all its channels have the voxels and geometry of the reference's. Constant channels
(e.g. an empty modality) alone do not make a copy: they carry no information about any case. The geometry is
a second, independent fact recorded with each copy (:meth:`ReferenceIndex.evidence`): a copy whose header
differs is a copy with an edited header, not another image.

A resampled, cropped, rescaled, noisy or rotated (other than by multiples of 90 degrees) copy is not
identical and is not found.
"""

from __future__ import annotations

import hashlib
import itertools
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
# version of the content fields and copy rule; records and cache entries of another version are made again
CONTENT_SCHEME = 2
_MIX = tuple(np.uint64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _sha1(voxels: np.ndarray) -> str:
    """SHA-1 of an array's shape and float32 bytes."""
    voxels = np.ascontiguousarray(voxels, dtype=np.float32)
    digest = hashlib.sha1(repr(voxels.shape).encode())
    digest.update(memoryview(voxels).cast("B"))
    return digest.hexdigest()


def _mixed(voxels: np.ndarray) -> np.ndarray:
    """Per voxel a 64-bit hash of its float32 bits (splitmix64), so that sums of them tell arrays apart."""
    z = np.ascontiguousarray(voxels, dtype=np.float32).view(np.uint32).astype(np.uint64) + _MIX[0]
    z = (z ^ (z >> np.uint64(30))) * _MIX[1]
    z = (z ^ (z >> np.uint64(27))) * _MIX[2]
    return z ^ (z >> np.uint64(31))


def canonical_orientations(voxels: np.ndarray) -> list[tuple[tuple[int, ...], tuple[bool, ...]]]:
    """The (axis order, flip per axis) that bring ``voxels`` into its canonical orientations: each axis read in
    the direction whose profile (wrapping 64-bit sums of :func:`_mixed` over the other axes) is the smaller,
    axes ordered by (size, that profile). Arrays that differ only by axis flips and transpositions have the
    same set of canonical arrays; ties (symmetric profiles) give several."""
    mixed = _mixed(voxels)
    axes = range(voxels.ndim)
    keys, flip_options = [], []
    for axis in axes:
        profile = mixed.sum(axis=tuple(a for a in axes if a != axis), dtype=np.uint64)
        forward, backward = tuple(profile.tolist()), tuple(profile[::-1].tolist())
        keys.append((voxels.shape[axis], min(forward, backward)))
        flip_options.append([flip for flip, p in ((False, forward), (True, backward)) if p == keys[-1][1]])
    orders = [order for order in itertools.permutations(axes)
              if all(keys[a] <= keys[b] for a, b in itertools.pairwise(order))]
    return [(order, flips) for order in orders for flips in itertools.product(*flip_options)]


def orientation_free_sha1(voxels: np.ndarray) -> str:
    """SHA-1 of ``voxels`` in canonical orientation: the same for arrays that differ only by axis flips and
    transpositions (as an image with other direction cosines can come out of a reorienting reader)."""
    if voxels.size == 0 or voxels.min() == voxels.max():  # constant: the value and the sorted shape say it all
        return _sha1(np.full(sorted(voxels.shape), voxels.flat[0] if voxels.size else 0, dtype=np.float32))
    return min(_sha1(voxels[tuple(slice(None, None, -1) if f else slice(None) for f in flips)].transpose(order))
               for order, flips in canonical_orientations(voxels))


def channel_contents(data: np.ndarray, geometries: list[Geometry]) -> list[dict]:
    """Per channel of ``data`` (C, *spatial): ``sha1`` of its voxels as read, ``sha1_any_orientation``, whether
    it is ``informative`` (not constant), and its ``geometry``."""
    contents = []
    for channel, geometry in zip(data, geometries, strict=True):
        voxels = np.asarray(channel, dtype=np.float32) + np.float32(0)  # -0.0 -> 0.0
        contents.append({"sha1": _sha1(voxels), "sha1_any_orientation": orientation_free_sha1(voxels),
                         "informative": bool(voxels.size and voxels.min() != voxels.max()),
                         "geometry": geometry.to_json()})
    return contents


def same_voxels(a: dict, b: dict) -> bool:
    """Whether two channel contents (:func:`channel_contents`) hold the same voxels, up to axis flips and
    transpositions, whatever their headers say."""
    return a["sha1_any_orientation"] == b["sha1_any_orientation"]


def geometry_differences(a: dict, b: dict) -> list[str]:
    """What differs between the headers (geometry) of two channel contents."""
    return Geometry.from_json(a["geometry"]).differences(Geometry.from_json(b["geometry"]))


def same_content(a: dict, b: dict) -> bool:
    """Whether two channel contents hold the same voxels on the same grid."""
    return same_voxels(a, b) and not geometry_differences(a, b)


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
                    self._by_hash[channel["sha1_any_orientation"]].append((reference, channel))
        dimensions = {len(c[0]["geometry"]["size"]) for r, c in cases.items() if r.startswith("imagesTr/")}
        self.dimension = dimensions.pop() if len(dimensions) == 1 else None

    def copies_of(self, channels: list[dict]) -> list[str]:
        """The reference cases ('imagesTs/CASE', 'imagesTr/CASE') that ``channels`` copy (see module docstring)."""
        found = {reference for channel in channels if channel["informative"]
                 for reference, _ in self._by_hash.get(channel["sha1_any_orientation"], [])}
        found |= {reference for reference, others in self.cases.items() if len(others) == len(channels)
                  and all(same_content(a, b) for a, b in zip(channels, others, strict=True))}
        return sorted(found, key=lambda r: (not r.startswith("imagesTs/"), r))

    def evidence(self, channels: list[dict], reference: str) -> str:
        """Why ``channels`` copy ``reference``, voxels and header each, e.g. 'channel 0 = its channel 0, flipped or
        transposed; header differs: origin (10, 10, 10) vs (0, 0, 0)'."""
        pairs = [(i, j, a, b) for i, a in enumerate(channels) for j, b in enumerate(self.cases[reference])
                 if same_voxels(a, b) and (a["informative"] or i == j)]
        i, j, a, b = min(pairs, key=lambda p: (p[0] != p[1], bool(geometry_differences(p[2], p[3])), p[:2]))
        turned = "" if a["sha1"] == b["sha1"] else ", flipped or transposed"
        header = geometry_differences(a, b)
        return (f"channel {i} = its channel {j}{turned}; "
                + (f"header differs: {'; '.join(header)}" if header else "same header"))


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
            if [entry.get(k) for k in ("files", "reader", "scheme")] == [signature, reader_name, CONTENT_SCHEME]:
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
            cache[key] = {"files": signature, "reader": reader_name, "scheme": CONTENT_SCHEME, "channels": channels}
        cache = {k: v for k, v in cache.items() if k in cases}
        os.makedirs(cache_folder, exist_ok=True)
        with open(cache_path + ".tmp", "w") as f:
            json.dump(cache, f)
        os.replace(cache_path + ".tmp", cache_path)
    return ReferenceIndex(cases, ids)
