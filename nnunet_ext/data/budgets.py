"""Label budgets: nested, reproducible subsets of a fold's training cases."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

ORDER_FILE = "labeled_order.json"
# what a fold's output folder records about the cases it trained with (labeled; unlabeled for ss* trainers)
LABELED_IDS_FILE = "labeled_cases.json"
UNLABELED_IDS_FILE = "unlabeled_cases.json"
DEFAULT_SEED = 12345


def load_order_file(path: str) -> list[str]:
    """Read an ordered case list: a JSON list of ids, or an object whose ``train`` key holds one."""
    with open(path) as f:
        content = json.load(f)
    ids = content.get("train") if isinstance(content, dict) else content
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{path}: expected a JSON list of case ids, or an object with a 'train' list "
                         f"(like the paper's split file).")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: the case list contains duplicates.")
    return ids


def labeled_order(train_ids: Sequence[str], order: Sequence[str] | None = None,
                  seed: int = DEFAULT_SEED) -> list[str]:
    """Order a fold's training cases for labelling: pinned ids first (in file order), the rest seeded.

    Independent of the budget, so the first N of the result are nested across budgets. Ids in
    ``order`` that are not training cases of this fold (e.g. validation cases) are skipped.
    """
    train_set = set(train_ids)
    pinned = [i for i in (order or ()) if i in train_set]
    pinned_set = set(pinned)
    rest = sorted(i for i in train_set if i not in pinned_set)
    permutation = np.random.RandomState(seed).permutation(len(rest))
    return pinned + [rest[i] for i in permutation]


def split_budget(train_ids: Sequence[str], budget: int, order: Sequence[str] | None = None,
                 seed: int = DEFAULT_SEED) -> tuple[list[str], list[str]]:
    """Split :func:`labeled_order` at ``budget``: (labeled cases, the rest in order); fail when too few."""
    if budget < 1:
        raise ValueError(f"Label budget must be at least 1, got {budget}.")
    if budget > len(train_ids):
        raise ValueError(f"Label budget {budget} exceeds the {len(train_ids)} training cases of this fold; "
                         f"choose _<N>labels with N <= {len(train_ids)}.")
    ordering = labeled_order(train_ids, order, seed)
    return ordering[:budget], ordering[budget:]


def order_file_path(preprocessed_dataset_folder: str) -> str:
    """Where a user pins the labeled ordering: next to ``splits_final.json``."""
    return os.path.join(preprocessed_dataset_folder, ORDER_FILE)
