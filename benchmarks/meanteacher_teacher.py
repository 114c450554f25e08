"""Does MeanTeacher's EMA teacher segment better than its student (the checkpoint's ``network_weights``)?

For each given MeanTeacher trainer (e.g. the repeats ``..._s0 _s1 _s2`` of a study) and fold: writes
``checkpoint_teacher.pth`` beside ``checkpoint_final.pth`` (the same checkpoint with ``network_weights`` :=
``teacher_weights``; nothing is overwritten), predicts the labeled test split with student and teacher
(``nnUNetv2_predict -chk``), evaluates both (BraTS empty-mask convention) and compares teacher − student per
region, paired over repeats × test cases (crossed bootstrap interval and Wilcoxon p of
:mod:`nnunet_ext.evaluation.statistics`). Prints a table and writes ``meanteacher_teacher.json``.

    python benchmarks/meanteacher_teacher.py -d 989 -p nnUNetCPUGNPlans -c 2d -f 0 --device cpu \\
        --trainers MeanTeacherTrainer_6labels_10epochs_50iters_noMirroring_s{0,1,2}
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from nnunet_ext.evaluation.evaluate import evaluate_folder
from nnunet_ext.evaluation.report import summary_case_results
from nnunet_ext.evaluation.statistics import compare
from nnunet_ext.files import write_json_atomic
from nnunet_ext.pipeline import Experiment, log, run_command

TEACHER_CHECKPOINT = "checkpoint_teacher.pth"


def write_teacher_checkpoint(fold_folder: str) -> str:
    """``checkpoint_final.pth`` with the teacher as ``network_weights``, written once beside it."""
    path = os.path.join(fold_folder, TEACHER_CHECKPOINT)
    if not os.path.isfile(path):
        checkpoint = torch.load(os.path.join(fold_folder, "checkpoint_final.pth"), map_location="cpu",
                                weights_only=False)
        if "teacher_weights" not in checkpoint:
            raise ValueError(f"{fold_folder}/checkpoint_final.pth has no teacher_weights: not a MeanTeacher run")
        checkpoint["network_weights"] = checkpoint.pop("teacher_weights")
        torch.save(checkpoint, path + ".partial")
        os.replace(path + ".partial", path)
    return path


def dice_per_region(summary: dict) -> dict[str, dict[str, float]]:
    """{region: {case: Dice}} of an evaluation summary."""
    per_region: dict[str, dict[str, float]] = {}
    for result in summary_case_results(summary, "", "", 0, None, ()):
        per_region.setdefault(result.region, {})[result.case] = result.dice
    return per_region


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", type=int, required=True)
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-f", "--fold", type=int, default=0)
    parser.add_argument("--trainers", nargs="+", required=True, help="MeanTeacher trainers (repeats) to compare")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--output", default="benchmarks/results")
    args = parser.parse_args()
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    name = maybe_convert_to_dataset_name(args.d)
    env = dict(os.environ)
    raw = os.path.join(env["nnUNet_raw"], name)
    output = os.path.abspath(args.output)
    experiment = Experiment(args.d, name, env, os.path.join(output, "logs"), args.plans, args.configuration,
                            args.device)
    dice: dict[str, list[dict[str, dict[str, float]]]] = {"student": [], "teacher": []}
    for trainer in args.trainers:
        fold_folder = os.path.join(experiment.result_folder(trainer), f"fold_{args.fold}")
        write_teacher_checkpoint(fold_folder)
        for network, checkpoint in (("student", "checkpoint_final.pth"), ("teacher", TEACHER_CHECKPOINT)):
            predictions = os.path.join(output, "meanteacher_teacher", trainer, network)
            log(f"{trainer}: predicting imagesTs with the {network}", "teacher-vs-student")
            run_command(experiment.predict_command(trainer, [args.fold], os.path.join(raw, "imagesTs"), predictions,
                                                   "-chk", checkpoint), env, experiment.predict_log(trainer),
                        echo=False)
            summary = evaluate_folder(os.path.join(raw, "labelsTs"), predictions, os.path.join(raw, "dataset.json"))
            dice[network].append(dice_per_region(summary))
    rows = []
    print("\n| region | student Dice | teacher Dice | teacher − student [95% CI] | Wilcoxon p |")
    print("|---|---:|---:|---|---:|")
    for region in dice["student"][0]:
        cases = sorted(dice["student"][0][region])
        values = {n: np.array([[run[region][c] for c in cases] for run in runs]) for n, runs in dice.items()}
        result = compare(values["teacher"], values["student"])
        rows.append({"region": region, "student": float(np.nanmean(values["student"])),
                     "teacher": float(np.nanmean(values["teacher"])), "difference": result.mean,
                     "low": None if result.too_few_cases else result.low,
                     "high": None if result.too_few_cases else result.high, "p": result.p_value,
                     "pairs": result.n_pairs, "cases": result.n_cases})
        interval = (f"(no interval: {result.n_cases} test cases, fewer than {result.min_cases})"
                    if result.too_few_cases else f"[{result.low:+.3f}, {result.high:+.3f}]")
        print(f"| {region} | {rows[-1]['student']:.3f} | {rows[-1]['teacher']:.3f} | {result.mean:+.3f} "
              f"{interval} | {result.p_value:.3g} |")
    path = os.path.join(output, "meanteacher_teacher.json")
    os.makedirs(output, exist_ok=True)
    write_json_atomic(path, {"trainers": args.trainers, "fold": args.fold, "dataset": name, "plans": args.plans,
                             "configuration": args.configuration, "rows": rows}, indent=2)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
