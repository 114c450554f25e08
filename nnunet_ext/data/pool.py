"""The unlabeled pool of a fold: where preprocessed unlabeled images live, and which may be trained on.

Pool sources (both optional, combined): (1) the fold's training cases beyond the label budget (images
only), (2) preprocessed ``imagesUnlabeled``. Leakage guard: the fold's validation cases, the dataset's
labeled test split and copies of either (from the manifest of ``nnunet-ext preprocess-unlabeled``) never
enter the pool, whatever the folders contain.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from nnunet_ext.data.budgets import DEFAULT_SEED

UNLABELED_RAW = "imagesUnlabeled"
MANIFEST = "unlabeled_manifest.json"


def unlabeled_folder(preprocessed_dataset_folder: str, data_identifier: str) -> str:
    """Where the preprocessed unlabeled images of one configuration live."""
    return os.path.join(preprocessed_dataset_folder, f"{data_identifier}_unlabeled")


def complete_cases(dataset_class, folder: str) -> list[str]:
    """Case ids in a preprocessed folder whose properties file exists (written last, so the case is complete)."""
    return [i for i in dataset_class.get_identifiers(folder) if os.path.isfile(os.path.join(folder, i + ".pkl"))]


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
