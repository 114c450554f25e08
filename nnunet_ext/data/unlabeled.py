"""The unlabeled pool of a fold, and the loader that mixes labeled and unlabeled patches.

Pool sources (both optional, combined): (1) the fold's training cases beyond the label budget (images
only: their labels are zeroed in every batch and never used for crops), (2) preprocessed
``imagesUnlabeled``. Leakage guard: the fold's validation cases, the dataset's labeled test split and
copies of either (by content hash) never enter the pool, whatever the folders contain.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_ext.data.budgets import DEFAULT_SEED
from nnunet_ext.data.preprocess_unlabeled import MANIFEST


@dataclass
class UnlabeledPool:
    """Ordered pool of unlabeled case ids, where each comes from, and what was excluded and why."""

    ids: list[str]
    source: dict[str, str]
    excluded: dict[str, str] = field(default_factory=dict)

    def select(self, count: int | None) -> list[str]:
        """The first ``count`` ids (all when None): nested across counts; fail when the pool is smaller."""
        if count is None:
            return list(self.ids)
        if count > len(self.ids):
            raise ValueError(f"{count} unlabeled images requested but the pool has only {len(self.ids)} "
                             f"({self.summary()}); choose _<M>unlabeled with M <= {len(self.ids)}.")
        return self.ids[:count]

    def summary(self) -> str:
        """Counts per source, e.g. '5 fold training cases beyond the budget, 16 imagesUnlabeled'."""
        counts = {s: sum(v == s for v in self.source.values()) for s in sorted(set(self.source.values()))}
        return ", ".join(f"{n} {s}" for s, n in counts.items()) or "empty"


def raw_test_ids(raw_dataset_folder: str | None, file_ending: str) -> set[str]:
    """Case ids of the dataset's labeled held-out test split (raw imagesTs / labelsTs)."""
    ids: set[str] = set()
    if raw_dataset_folder is None:
        return ids
    for split, suffix_len in (("labelsTs", len(file_ending)), ("imagesTs", len("_0000") + len(file_ending))):
        folder = os.path.join(raw_dataset_folder, split)
        if os.path.isdir(folder):
            ids |= {f[:-suffix_len] for f in os.listdir(folder) if f.endswith(file_ending)}
    return ids


def build_pool(beyond_budget: Sequence[str], folder_ids: Sequence[str], labeled: Sequence[str],
               validation: Sequence[str], test: set[str], duplicates: dict[str, str | None] | None = None,
               seed: int = DEFAULT_SEED) -> UnlabeledPool:
    """Combine both sources, drop leaking or repeated ids, and order the rest deterministically.

    ``duplicates`` maps an imagesUnlabeled id to 'imagesTr/CASE' or 'imagesTs/CASE' it is a copy of.
    The order is a seeded permutation of the sorted pool, independent of how many are later selected.
    """
    forbidden = {**{i: "validation case of this fold" for i in validation},
                 **{i: "labeled test split" for i in test}}
    excluded, source = {}, {}
    for i in beyond_budget:
        if i in forbidden:
            excluded[i] = forbidden[i]
        else:
            source[i] = "fold training cases beyond the label budget"
    labeled_set = set(labeled)
    for i in folder_ids:
        copy_of = (duplicates or {}).get(i)
        copy_id = copy_of.split("/", 1)[1] if copy_of else None
        if i in forbidden:
            excluded[i] = f"imagesUnlabeled id is a {forbidden[i]}"
        elif copy_id in forbidden or (copy_of or "").startswith("imagesTs/"):
            excluded[i] = f"imagesUnlabeled image is a copy of {copy_of} ({forbidden.get(copy_id, 'test split')})"
        elif i in labeled_set or copy_id in labeled_set:
            excluded[i] = "imagesUnlabeled image is a labeled training case of this fold"
        elif i in source:
            excluded[f"imagesUnlabeled/{i}"] = "same id as a fold training case already in the pool"
        else:
            source[i] = "imagesUnlabeled"
    ordered = sorted(source)
    permutation = np.random.RandomState(seed).permutation(len(ordered))
    return UnlabeledPool([ordered[k] for k in permutation], source, excluded)


def load_manifest(folder: str) -> dict[str, str | None]:
    """imagesUnlabeled id -> the labeled/test case it duplicates (from preprocess-unlabeled), if any."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return {case: entry.get("duplicate_of") for case, entry in json.load(f).items()}


class PooledDataset:
    """nnU-Net dataset over labeled ids and unlabeled ids that may live in two preprocessed folders."""

    def __init__(self, labeled, unlabeled_parts: Sequence, unlabeled_fraction: float):
        self.labeled_ids = list(labeled.identifiers)
        self.unlabeled_ids = [i for part in unlabeled_parts for i in part.identifiers]
        self._owner = {i: labeled for i in self.labeled_ids}
        self._owner.update({i: part for part in unlabeled_parts for i in part.identifiers})
        self._labeled_set = set(self.labeled_ids)
        self.identifiers = self.labeled_ids + self.unlabeled_ids
        self.unlabeled_fraction = unlabeled_fraction

    def load_case(self, identifier: str):
        """Load from whichever folder holds the case; unlabeled cases get ``class_locations`` None (no
        labels to sample from: :class:`SemiSupervisedDataLoader` crops them at random)."""
        data, seg, seg_prev, properties = self._owner[identifier].load_case(identifier)
        if identifier not in self._labeled_set:
            properties = dict(properties, class_locations=None)
        return data, seg, seg_prev, properties


def split_batch(batch_size: int, unlabeled_fraction: float) -> tuple[int, int]:
    """(labeled, unlabeled) samples per batch: round(B * fraction) unlabeled, at least one of each."""
    n_unlabeled = min(max(1, round(batch_size * unlabeled_fraction)), max(1, batch_size - 1))
    return max(1, batch_size - n_unlabeled), n_unlabeled


class SemiSupervisedDataLoader(nnUNetDataLoader):
    """nnU-Net's loader with a fixed labeled/unlabeled split of every batch and a ``labeled`` mask.

    Labeled samples come first and follow nnU-Net's foreground oversampling; unlabeled samples are
    cropped at random and their segmentation is zeroed, so no label of an unlabeled case leaves the
    loader. Same spatial and intensity augmentation for both (nnU-Net's transforms, in its workers).
    """

    def __init__(self, data: PooledDataset, batch_size: int, *args, **kwargs):
        self.n_labeled, self.n_unlabeled = split_batch(batch_size, data.unlabeled_fraction)
        super().__init__(data, self.n_labeled + self.n_unlabeled, *args, **kwargs)
        self.get_do_oversample = self._oversample_labeled_only  # nnU-Net sets this per instance

    def get_indices(self) -> list[str]:
        """n_labeled random labeled ids, then n_unlabeled random unlabeled ids."""
        return list(np.random.choice(self._data.labeled_ids, self.n_labeled)) + \
            list(np.random.choice(self._data.unlabeled_ids, self.n_unlabeled))

    def _oversample_labeled_only(self, sample_idx: int) -> bool:
        """nnU-Net's rule within the labeled part; never for unlabeled samples."""
        if sample_idx >= self.n_labeled:
            return False
        return not sample_idx < round(self.n_labeled * (1 - self.oversample_foreground_percent))

    def get_bbox(self, data_shape, force_fg: bool, class_locations, overwrite_class=None, verbose: bool = False):
        """nnU-Net's crop; an unlabeled case (``class_locations`` None) is cropped at random even when the
        dataset has an ignore label (nnU-Net would then look for annotated voxels in the labels)."""
        if class_locations is not None:
            return super().get_bbox(data_shape, force_fg, class_locations, overwrite_class, verbose)
        if force_fg:
            raise RuntimeError("foreground oversampling was requested for an unlabeled case")
        has_ignore, self.has_ignore = self.has_ignore, False
        try:
            return super().get_bbox(data_shape, False, None, overwrite_class, verbose)
        finally:
            self.has_ignore = has_ignore

    def generate_train_batch(self) -> dict:
        """nnU-Net's batch plus ``labeled`` (bool, B); unlabeled targets are all zero."""
        batch = super().generate_train_batch()
        labeled = torch.arange(self.batch_size) < self.n_labeled
        targets = batch["target"] if isinstance(batch["target"], list) else [batch["target"]]
        for t in targets:
            t[~labeled] = 0
        batch["labeled"] = labeled
        return batch
