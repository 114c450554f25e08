"""The paper's split ships with nnunet_ext: its nested labeled subsets, paper-split and convert-msd --test-ids paper."""

from __future__ import annotations

import json
from pathlib import Path

from nnunet_ext import cli
from nnunet_ext.data.budgets import load_order_file, split_budget
from nnunet_ext.datasets import msd
from nnunet_ext.datasets.paper_split import load_paper_split, paper_split_path

DATASET = "Dataset001_BrainTumour"


def test_shipped_split_is_the_papers():
    split = load_paper_split()
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (387, 48, 49)
    every = split["train"] + split["val"] + split["test"]
    assert sorted(every) == [f"BRATS_{i:03d}" for i in range(1, 485)]
    for k, subset in split["labeled_subsets"].items():
        assert subset == split["train"][: int(k)]
        # as labeled_order.json, the k-label budget of a fold holding the whole training list is the paper's
        assert split_budget(split["train"], int(k), load_order_file(paper_split_path()))[0] == subset


def test_paper_split_writes_labeled_order_and_one_fold(tmp_path, monkeypatch, capsys):
    folder = tmp_path / DATASET
    folder.mkdir()
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    assert cli.main(["paper-split", "-d", "1", "--splits"]) == 0
    split = load_paper_split()
    assert json.loads((folder / "labeled_order.json").read_text()) == split["train"]
    assert json.loads((folder / "splits_final.json").read_text()) == [{"train": split["train"],
                                                                       "val": split["val"]}]
    assert cli.main(["paper-split", "-d", "1"]) == 0  # idempotent
    assert "already holds the paper's split" in capsys.readouterr().out
    (folder / "labeled_order.json").write_text(json.dumps(["BRATS_001"]))
    assert cli.main(["paper-split", "-d", "1"]) == 2  # nothing else is overwritten silently
    assert "labeled_order.json exists with other content; pass --overwrite" in capsys.readouterr().err
    assert json.loads((folder / "labeled_order.json").read_text()) == ["BRATS_001"]
    assert cli.main(["paper-split", "-d", "1", "--overwrite"]) == 0
    assert json.loads((folder / "labeled_order.json").read_text()) == split["train"]


def test_paper_split_needs_a_planned_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    (tmp_path.parent / "raw" / DATASET).mkdir(parents=True)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path.parent / "raw"))
    assert cli.main(["paper-split", "-d", "1"]) == 2
    assert "plan the dataset first" in capsys.readouterr().err


def test_convert_msd_test_ids_paper_takes_the_papers_test_cases():
    ids = [f"BRATS_{i:03d}" for i in range(1, 485)]
    train, test, provenance = msd.make_split(ids, 49, 0, Path(paper_split_path()))
    assert test == sorted(load_paper_split()["test"]) and len(train) == 435
    assert provenance["source"].endswith("pfn_split_cv0.json")

