"""The unlabeled pool of a fold: where preprocessed unlabeled images live, and which may be trained on.

Pool sources (both optional, combined): (1) the fold's training cases beyond the label budget (images
only), (2) preprocessed ``imagesUnlabeled``. Leakage guard: the fold's validation cases, the dataset's
labeled test split and copies of either never enter the pool, whatever the folders contain. Copies are
found by content when ``nnunet-ext preprocess-unlabeled`` preprocesses a case (:mod:`nnunet_ext.data.duplicates`);
the result is the case's record in the manifest folder, written before the case is complete. A case
without a record, or checked before one of today's validation, test or labeled cases existed, is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from nnunet_ext.data.budgets import DEFAULT_SEED
from nnunet_ext.data.duplicates import CONTENT_SCHEME

UNLABELED_RAW = "imagesUnlabeled"
MANIFEST = "manifest"  # folder of one JSON record per preprocessed case (see preprocess_unlabeled)


def unlabeled_folder(preprocessed_dataset_folder: str, data_identifier: str) -> str:
    """Where the preprocessed unlabeled images of one configuration live."""
    return os.path.join(preprocessed_dataset_folder, f"{data_identifier}_unlabeled")


def record_path(folder: str, case: str) -> str:
    """Where the record (content hashes, duplicate check) of one preprocessed unlabeled case lives."""
    return os.path.join(folder, MANIFEST, case + ".json")


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


def raw_test_ids(raw_dataset_folder: str, file_ending: str) -> set[str]:
    """Case ids of the dataset's labeled held-out test split (raw imagesTs / labelsTs; empty when it has neither);
    raise FileNotFoundError when the raw dataset folder does not exist."""
    if not os.path.isdir(raw_dataset_folder):
        raise FileNotFoundError(f"raw dataset folder {raw_dataset_folder} does not exist, so its test split "
                                f"(imagesTs, labelsTs) cannot be kept out of unlabeled and pseudo-labeled images; "
                                f"set nnUNet_raw to the folder that holds {os.path.basename(raw_dataset_folder)}.")
    ids: set[str] = set()
    for split, suffix_len in (("labelsTs", len(file_ending)), ("imagesTs", len("_0000") + len(file_ending))):
        folder = os.path.join(raw_dataset_folder, split)
        if os.path.isdir(folder):
            ids |= {f[:-suffix_len] for f in os.listdir(folder) if f.endswith(file_ending)}
    return ids


def unpreprocessed_unlabeled(raw_dataset_folder: str, file_ending: str, preprocessed: Sequence[str]) -> list[str]:
    """Case ids of the raw ``imagesUnlabeled/`` (by file name) that have no complete preprocessed copy among
    ``preprocessed``; empty when the dataset has no such folder."""
    folder = os.path.join(raw_dataset_folder, UNLABELED_RAW)
    if not os.path.isdir(folder):
        return []
    suffix = len("_0000") + len(file_ending)
    raw = {f[:-suffix] for f in os.listdir(folder) if f.endswith(file_ending) and not f.startswith(".")}
    return sorted(raw - set(preprocessed))


@dataclass(frozen=True)
class DuplicateCheck:
    """The duplicate check of one imagesUnlabeled case: the labeled/test cases it copies ('imagesTs/CASE'),
    and the ids of all cases it was compared with."""

    copies: tuple[str, ...]
    checked: frozenset[str]


def build_pool(beyond_budget: Sequence[str], folder_ids: Sequence[str], labeled: Sequence[str],
               validation: Sequence[str], test: set[str], duplicates: Mapping[str, DuplicateCheck] | None = None,
               seed: int = DEFAULT_SEED) -> UnlabeledPool:
    """Combine both sources, drop leaking or repeated images, and order the rest deterministically.

    ``duplicates`` holds the check of every imagesUnlabeled id (:func:`load_manifest`); an id without one,
    or whose check did not compare it with every validation, test and labeled case, is an error.
    The order is a seeded permutation of the sorted pool, independent of how many are later selected.
    """
    duplicates = duplicates or {}
    _require_checks(folder_ids, duplicates, set(validation) | set(test) | set(labeled))
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
        copies = {c: c.split("/", 1)[1] for c in duplicates[i].copies}  # 'imagesTs/CASE' -> CASE
        leaked = [c for c, case in copies.items() if c.startswith("imagesTs/") or case in forbidden]
        in_pool = [c for c, case in copies.items() if case in source]
        if i in forbidden:
            excluded[i] = f"imagesUnlabeled id is a {forbidden[i]}"
        elif leaked:
            excluded[i] = (f"imagesUnlabeled image is a copy of {leaked[0]} "
                           f"({forbidden.get(copies[leaked[0]], 'labeled test split')})")
        elif i in labeled_set or labeled_set & set(copies.values()):
            excluded[i] = "imagesUnlabeled image is a labeled training case of this fold"
        elif i in source:
            excluded[f"imagesUnlabeled/{i}"] = "same id as a fold training case already in the pool"
        elif in_pool:
            excluded[i] = f"imagesUnlabeled image is a copy of {in_pool[0]}, a fold training case already in the pool"
        else:
            source[i] = "imagesUnlabeled"
    ordered = sorted(source)
    permutation = np.random.RandomState(seed).permutation(len(ordered))
    return UnlabeledPool([ordered[k] for k in permutation], source, excluded)


def _require_checks(folder_ids: Sequence[str], duplicates: Mapping[str, DuplicateCheck], must_know: set[str]) -> None:
    """Raise ValueError for imagesUnlabeled ids without a duplicate check, or checked before a case existed."""
    rerun = ("rerun 'nnunet-ext preprocess-unlabeled' with this dataset, configuration and plans: it checks "
             "them against today's imagesTr, imagesTs and labelsTs")
    missing = [i for i in folder_ids if i not in duplicates]
    if missing:
        raise ValueError(f"preprocessed imagesUnlabeled cases {missing[:10]} have no duplicate check (preprocessed "
                         f"by an interrupted or older nnunet-ext); {rerun}.")
    stale = [i for i in folder_ids if must_know - duplicates[i].checked]
    if stale:
        unknown = sorted(set().union(*(must_know - duplicates[i].checked for i in stale)))
        raise ValueError(f"preprocessed imagesUnlabeled cases {stale[:10]} were checked for copies before the cases "
                         f"{unknown[:10]} existed in imagesTr/imagesTs/labelsTs; {rerun}.")


def load_manifest(folder: str) -> dict[str, DuplicateCheck]:
    """The duplicate check of every case recorded in a preprocessed unlabeled folder by today's rule (empty when
    none; a record of an older rule counts as none)."""
    records = os.path.join(folder, MANIFEST)
    if not os.path.isdir(records):
        return {}
    checks = {}
    for name in sorted(os.listdir(records)):
        if name.endswith(".json"):
            with open(os.path.join(records, name)) as f:
                record = json.load(f)
            if record.get("content_scheme") != CONTENT_SCHEME:
                continue
            checks[name[:-len(".json")]] = DuplicateCheck(tuple(record["duplicate_of"]),
                                                          frozenset(record["checked_against"]))
    return checks
