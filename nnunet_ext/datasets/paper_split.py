"""The paper's data split of MSD Task01 (cv0 of Iwasawa et al.), shipped with nnunet_ext, for nnU-Net.

``nnunet_ext/resources/pfn_split_cv0.json`` holds the authors' published lists (387 train, 48 validation,
49 test; labeled subsets 3/6/12/24/96 = the first k of ``train``), in their file order. Use it in two steps:

    nnunet-ext convert-msd -i Task01_BrainTumour -d 1 --test-ids paper   # the paper's 49 test cases
    nnunet-ext paper-split -d 1 [--splits]                               # after planning/preprocessing

``paper-split`` writes ``labeled_order.json`` (the paper's training list: ``_6labels`` = the paper's six)
next to ``splits_final.json`` in ``$nnUNet_preprocessed/DatasetXXX_NAME/``; with ``--splits`` also a
one-fold ``splits_final.json`` (fold 0 = the paper's 387 training and 48 validation cases).
"""

from __future__ import annotations

import argparse
import json
import os
from importlib import resources


def load_paper_split() -> dict:
    """The paper's split: ``train``, ``val``, ``test`` (MSD imagesTr ids), ``labeled_subsets``, provenance."""
    with resources.files("nnunet_ext.resources").joinpath("pfn_split_cv0.json").open() as f:
        return json.load(f)


def paper_split_path() -> str:
    """Path of the shipped split file (usable wherever a split JSON file is asked for)."""
    return str(resources.files("nnunet_ext.resources").joinpath("pfn_split_cv0.json"))


def _write_new(path: str, content, overwrite: bool) -> str:
    """Write JSON unless a different file is there (then refuse, unless ``overwrite``); return what was done."""
    if os.path.isfile(path):
        with open(path) as f:
            if json.load(f) == content:
                return f"{path} already holds the paper's split"
        if not overwrite:
            raise FileExistsError(f"{path} exists with other content; pass --overwrite to replace it")
    with open(path, "w") as f:
        json.dump(content, f, indent=2)
    return f"wrote {path}"


def write_paper_split(dataset: str | int, splits: bool = False, overwrite: bool = False) -> list[str]:
    """Write labeled_order.json (and with ``splits`` a one-fold splits_final.json) for ``dataset``."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_ext.data.budgets import order_file_path

    folder = os.path.join(nnUNet_preprocessed, maybe_convert_to_dataset_name(dataset))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} does not exist: plan the dataset first (nnunet-ext plan / "
                                f"nnUNetv2_plan_and_preprocess), then write the paper's split")
    split = load_paper_split()
    done = [_write_new(order_file_path(folder), split["train"], overwrite)]
    if splits:
        done.append(_write_new(os.path.join(folder, "splits_final.json"),
                               [{"train": split["train"], "val": split["val"]}], overwrite))
    return done


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``-d`` as nnU-Net's commands."""
    parser.add_argument("-d", required=True, help="dataset id or name (converted with convert-msd)")
    parser.add_argument("--splits", action="store_true",
                        help="also write splits_final.json with one fold: the paper's 387 training / 48 "
                             "validation cases (nnU-Net's own 5-fold split otherwise)")
    parser.add_argument("--overwrite", action="store_true", help="replace files that hold something else")


def run(args: argparse.Namespace) -> int:
    """Write the files and say what was done."""
    for line in write_paper_split(args.d, args.splits, args.overwrite):
        print(f"[paper-split] {line}")
    return 0
