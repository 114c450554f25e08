"""Label budgets are nested, deterministic, pinnable and never exceed the fold."""

import json

import pytest

from nnunet_ext.data.budgets import DEFAULT_SEED, labeled_order, load_order_file, split_budget

TRAIN = [f"case_{i:03d}" for i in range(40)]


def labeled(train_ids, budget, order=None, seed=DEFAULT_SEED):
    """The labeled part of split_budget, checking that the rest is the remainder of the same ordering."""
    chosen, rest = split_budget(train_ids, budget, order, seed)
    assert chosen + rest == labeled_order(train_ids, order, seed)
    return chosen


def test_budgets_are_nested_and_deterministic():
    subsets = [labeled(TRAIN, n) for n in (3, 6, 12, 24)]
    for small, large in zip(subsets, subsets[1:]):
        assert large[:len(small)] == small
    assert labeled(list(reversed(TRAIN)), 6) == subsets[1]  # input order does not matter
    assert labeled(TRAIN, 6, seed=1) != subsets[1]
    assert len(set(subsets[-1])) == 24 and set(subsets[-1]) <= set(TRAIN)


def test_pinned_order_comes_first_and_skips_foreign_ids():
    order = ["case_010", "val_case", "case_003", "case_020"]
    ordering = labeled_order(TRAIN, order)
    assert ordering[:3] == ["case_010", "case_003", "case_020"]
    assert "val_case" not in ordering and sorted(ordering) == TRAIN
    assert labeled(TRAIN, 2, order) == ["case_010", "case_003"]


def test_budget_larger_than_fold_fails_clearly():
    with pytest.raises(ValueError, match="exceeds the 40 training cases"):
        split_budget(TRAIN, 41)
    with pytest.raises(ValueError, match="at least 1"):
        split_budget(TRAIN, 0)


def test_order_file_formats(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(["a", "b"]))
    (tmp_path / "split.json").write_text(json.dumps({"train": ["c", "a"], "val": ["x"], "test": ["y"]}))
    (tmp_path / "bad.json").write_text(json.dumps({"val": ["x"]}))
    (tmp_path / "dup.json").write_text(json.dumps(["a", "a"]))
    assert load_order_file(str(tmp_path / "list.json")) == ["a", "b"]
    assert load_order_file(str(tmp_path / "split.json")) == ["c", "a"]
    with pytest.raises(ValueError, match="bad.json"):
        load_order_file(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="duplicates"):
        load_order_file(str(tmp_path / "dup.json"))


def test_paper_split_prefixes_are_budgets():
    """The paper's labeled subsets are prefixes of its train list: pinning it reproduces them."""
    from nnunet_ext.datasets.paper_split import load_paper_split, paper_split_path

    path = paper_split_path()  # the copy shipped inside the package
    split = load_paper_split()
    assert split["labeled_subsets"]
    order = load_order_file(path)
    for k, ids in split["labeled_subsets"].items():
        assert labeled(split["train"], int(k), order) == ids
