"""How far apart are two trainings of the same cells? The noise floor of a study's paired comparison.

A study pairs each model with its baseline on the same seed, labeled subset and augmentation, so what is left
between two models is the method *and* the chaos of training itself: with a short schedule, whether a small
region has appeared by the last iteration can turn on a floating-point rounding. This script measures that part
alone. Give it two study output folders that hold the *same* cells (same trainer names, so the same seeds,
subsets and augmentation draws), trained twice with only something that should not matter changed (e.g.
``OMP_NUM_THREADS=1`` vs ``2``: the same arithmetic summed in another order; another machine; on CUDA, two runs
of the same command). It pairs the second with the first exactly as ``nnunet-ext study`` pairs a model with its
baseline (:func:`nnunet_ext.evaluation.report.paired_tables`: crossed bootstrap interval over test cases and
repeats, Wilcoxon, Holm, worst repeat) and prints those tables. A model-vs-baseline difference, or a
non-inferiority margin, smaller than what this null control shows cannot be told from retraining the baseline.

    # the first training: any study output; the rerun: the same grid under another nnUNet_results
    nnUNet_results=$PWD/res_rerun OMP_NUM_THREADS=2 nnunet-ext study --preset cpu-evidence --trainers EncDec \\
        --labels 6 --repeats 10 --output rerun_6
    python benchmarks/rerun_noise.py --first study_6 --rerun rerun_6 --name "EncDec, 2 threads"

Writes ``rerun_noise.json`` (``--output`` folder): per policy, budget and region the interval, p values and the
worst repeat's ratio.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os

from nnunet_ext.evaluation.metrics import EMPTY_POLICIES
from nnunet_ext.evaluation.report import (
    CaseResult,
    index_cases,
    paired_rows,
    paired_tables,
    paired_values,
    summary_case_results,
)
from nnunet_ext.evaluation.statistics import worst_repeat_ratio
from nnunet_ext.files import write_json_atomic
from nnunet_ext.trainers.names import parse_trainer_name


def study_cases(folder: str, model: str) -> dict[tuple[str, str], list[CaseResult]]:
    """The per-case results of every evaluated cell of a study output folder, as ``model``, by (trainer, folds
    folder); raise FileNotFoundError naming the folder when it holds none."""
    found: dict[tuple[str, str], list[CaseResult]] = {}
    for summary_path in sorted(glob.glob(os.path.join(folder, "predictions", "*", "folds_*", "summary_brats.json"))):
        folds_folder = os.path.dirname(summary_path)
        trainer = os.path.basename(os.path.dirname(folds_folder))
        spec = parse_trainer_name(trainer)
        folds = tuple(int(f) for f in os.path.basename(folds_folder)[len("folds_"):].split("_"))
        cases = []
        for policy in EMPTY_POLICIES:
            with open(os.path.join(folds_folder, f"summary_{policy}.json")) as f:
                cases += summary_case_results(json.load(f), trainer, model, spec.labels, spec.unlabeled, folds,
                                              spec.seed or 0)
        found[trainer, os.path.basename(folds_folder)] = cases
    if not found:
        raise FileNotFoundError(f"{folder}: no predictions/<trainer>/folds_*/summary_brats.json; give the --output "
                                "folder of a study that has predicted and evaluated its cells")
    return found


def paired_cases(first: str, rerun: str, name: str) -> list[CaseResult]:
    """The cells both folders have, the first's as model ``first``, the rerun's as ``name``; raise ValueError when
    they share none, or when the rerun has a cell the first lacks (it would be left out silently)."""
    a, b = study_cases(first, "first"), study_cases(rerun, name)
    only = sorted(set(b) - set(a))
    if only:
        raise ValueError(f"{rerun} has cells {first} lacks: {', '.join('/'.join(k) for k in only)}; train the same "
                         "grid in both")
    if not b:
        raise ValueError(f"{first} and {rerun} share no cell")
    return [c for key in b for c in (*a[key], *b[key])]


def summary_rows(cases: list[CaseResult]) -> list[dict]:
    """One JSON row per policy, budget, region and metric: interval, p values and (Dice) the worst repeat."""
    index, rows = index_cases(cases), []
    for policy in dict.fromkeys(c.policy for c in cases):
        for row in paired_rows(cases, policy, baseline="first"):
            result = row.result
            entry = {"policy": policy, "labels": row.pairing.method.labels, "region": row.region,
                     "metric": row.metric, "repeats": len(row.pairing.repeats), "pairs": result.n_pairs,
                     "mean": result.mean, "low": result.low, "high": result.high, "p": result.p_value,
                     "p_holm": row.p_holm}
            if row.metric == "dice":
                ratio, worst = worst_repeat_ratio(*paired_values(index, row.pairing, policy, row.region, "dice"))
                entry.update(worst_ratio=ratio, worst_repeat=None if math.isnan(ratio) else row.pairing.repeats[worst])
            rows.append(entry)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--first", required=True, help="study output folder of the first training")
    parser.add_argument("--rerun", required=True, help="study output folder of the same cells trained again")
    parser.add_argument("--name", default="rerun", help="what changed, shown as the model name (default: rerun)")
    parser.add_argument("--output", default="benchmarks/results")
    parser.add_argument("--out-name", default="rerun_noise.json")
    args = parser.parse_args()

    cases = paired_cases(args.first, args.rerun, args.name)
    for policy in dict.fromkeys(c.policy for c in cases):
        print(f"## {args.name} − first ({policy} convention)\n")
        print(paired_tables(cases, policy, baseline="first"), "\n")
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, args.out_name)
    write_json_atomic(path, {"first": os.path.abspath(args.first), "rerun": os.path.abspath(args.rerun),
                             "name": args.name, "rows": summary_rows(cases)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
