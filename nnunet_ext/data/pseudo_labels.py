"""Pseudo-labeled cases of a fold: where they live, how confident the teacher was, and the record that says
which cases are pseudo-labeled and by which model.

Layout, per student trainer and fold (written by ``nnunet-ext self-train``, read by ``PseudoLabelTrainer``)::

    $nnUNet_preprocessed/DatasetXXX/pseudo_labels/<student>__<plans>__<configuration>/fold_<F>/
        request.json         teacher, its checkpoint's sha256, the pool and the rule (written before predicting)
        input/               links to the pool's raw images (what nnUNetv2_predict reads)
        predictions/         the teacher's predictions with probabilities (.nii.gz/.npz)
        cases/               kept cases preprocessed as labeled cases (image + pseudo label)
        pseudo_labels.json   the record; written last, so a fold without it has no pseudo labels yet

Confidence rule (:func:`case_score`): a voxel's confidence is the probability of the teacher's decision
(softmax: the largest class probability; regions: the least certain region, ``min_r max(p_r, 1 - p_r)``);
a case's score is the mean confidence over its *structure voxels*, those where some foreground class or
region has probability >= :data:`STRUCTURE_PROBABILITY` (the predicted foreground and its borderline); a case
in which the teacher sees no structure at all scores 0 (ranked last: an empty pseudo label of an image
that may well contain structure teaches a miss). :func:`keep_most_confident` keeps the top fraction.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

PSEUDO_ROOT = "pseudo_labels"
RECORD = "pseudo_labels.json"
REQUEST = "request.json"
# what a student's fold folder records about the pseudo-labeled cases it trained with
PSEUDO_IDS_FILE = "pseudo_labeled_cases.json"
STRUCTURE_PROBABILITY = 0.25
RULE = (f"score = mean teacher confidence (probability of its decision; regions: least certain region) over voxels "
        f"where some foreground class or region has probability >= {STRUCTURE_PROBABILITY}, 0 when there are none; "
        f"keep the top fraction by score (ties by case id)")


def pseudo_label_folder(preprocessed_dataset_folder: str, student: str, plans: str, configuration: str,
                        fold: int | None = None) -> str:
    """Where the pseudo-labeled cases of one student trainer and fold live (fold None: of all its folds)."""
    folder = os.path.join(preprocessed_dataset_folder, PSEUDO_ROOT, f"{student}__{plans}__{configuration}")
    return folder if fold is None else os.path.join(folder, f"fold_{fold}")


def cases_folder(folder: str) -> str:
    """The preprocessed pseudo-labeled cases of a fold's pseudo-label folder."""
    return os.path.join(folder, "cases")


def voxel_confidence(probabilities: np.ndarray, regions: bool) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, structure mask) per voxel of the teacher's probabilities (C, *spatial): see the module."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if regions:
        confidence = 0.5 + np.abs(probabilities - 0.5).min(0)
        structure = (probabilities >= STRUCTURE_PROBABILITY).any(0)
    else:
        confidence = probabilities.max(0)
        structure = (probabilities[1:] >= STRUCTURE_PROBABILITY).any(0)
    return confidence, structure


def case_score(probabilities: np.ndarray, regions: bool) -> float:
    """Mean confidence over the structure voxels, 0 when the teacher sees no structure (module docstring)."""
    confidence, structure = voxel_confidence(probabilities, regions)
    return float(confidence[structure].mean()) if structure.any() else 0.0


def keep_most_confident(scores: Mapping[str, float], fraction: float) -> list[str]:
    """The ``ceil(fraction * n)`` highest-scoring case ids (at least one), best first, ties by id."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--keep must be a fraction in (0, 1], got {fraction}")
    if not scores:
        raise ValueError("no pseudo-labeled case to keep: the unlabeled pool is empty")
    ranked = sorted(scores, key=lambda case: (-scores[case], case))
    return ranked[:max(1, math.ceil(fraction * len(ranked)))]


def read_json(path: str) -> dict | None:
    """A JSON file's content, or None when it does not exist."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_record(record: dict, folder: str, pool: Sequence[str], labeled: Sequence[str],
                 validation: Sequence[str], test: set[str]) -> list[str]:
    """The kept case ids of a fold's record after checking that they may be trained on; raise ValueError naming
    the folder when the pool changed since the pseudo labels were made, or a kept case is a labeled, validation
    or test case, or is missing from ``cases/``."""
    redo = f"delete {folder} and rerun 'nnunet-ext self-train' for this fold"
    if list(record["pool"]) != list(pool):
        raise ValueError(f"{folder}: the pseudo labels were made for another unlabeled pool ({len(record['pool'])} "
                         f"images) than this fold has now ({len(pool)}): imagesUnlabeled, the splits or the budget "
                         f"changed; {redo}.")
    kept = list(record["kept"])
    forbidden = {**{i: "labeled case" for i in labeled}, **{i: "validation case" for i in validation},
                 **{i: "test case" for i in test}}
    leaked = [f"{i} ({forbidden[i]})" for i in kept if i in forbidden]
    if leaked or not set(kept) <= set(pool):
        raise ValueError(f"{folder}: pseudo-labeled cases {leaked or sorted(set(kept) - set(pool))} are not from "
                         f"this fold's unlabeled pool; refusing to train on them; {redo}.")
    missing = [i for i in kept if not os.path.isfile(os.path.join(cases_folder(folder), i + ".pkl"))]
    if missing:
        raise ValueError(f"{folder}: pseudo-labeled cases {missing[:10]} are missing from cases/; {redo}.")
    return kept
