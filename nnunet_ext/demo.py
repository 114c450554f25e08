"""The CPU demo: synthetic data -> small plans -> preprocessing -> training -> fold ensemble -> Dice.

Every step is the real nnU-Net command (nnUNetv2_preprocess / train / predict) in a subprocess, so
the demo exercises exactly what a user runs. Writes into ``$nnUNet_raw``/``$nnUNet_preprocessed``/
``$nnUNet_results`` when those are set, else into ``--output`` (default ./nnunet_ext_demo). Finished
steps are skipped on a rerun; an interrupted training resumes with ``--c``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from nnunet_ext.datasets.synthetic import DEFAULT_DATASET_ID, DEFAULT_NAME, DEFAULT_SHAPE, make_demo_dataset
from nnunet_ext.pipeline import Experiment, log, run_command
from nnunet_ext.trainers.names import PAPER_MODELS, trainer_name

PLANNER, PLANS = "nnUNetPlannerCPUGN", "nnUNetCPUGNPlans"  # one set of plans for every trainer compared
CONFIGURATION = "3d_fullres"


def demo_environment(output: str) -> dict[str, str]:
    """nnU-Net's folder variables (kept when set, else under ``output``) plus CPU-friendly settings."""
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env.setdefault(var, os.path.abspath(os.path.join(output, var)))
        os.makedirs(env[var], exist_ok=True)
    env.setdefault("nnUNet_def_n_proc", "2")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def prepare_dataset(args: argparse.Namespace, env: dict[str, str]) -> str:
    """Write the demo dataset (unless present), plan it with the CPU planner and preprocess it."""
    raw = os.path.join(env["nnUNet_raw"], f"Dataset{args.d:03d}_{DEFAULT_NAME}")
    if os.path.isfile(os.path.join(raw, "dataset.json")):
        log(f"using existing demo dataset {raw}", "demo")
    else:
        log("writing the synthetic demo dataset", "demo")
        make_demo_dataset(args.d, env["nnUNet_raw"], args.num_train, args.num_test, args.num_unlabeled,
                          shape=args.shape, seed=args.seed)
    preprocessed = os.path.join(env["nnUNet_preprocessed"], os.path.basename(raw))
    if not os.path.isdir(os.path.join(preprocessed, f"{PLANS}_{CONFIGURATION}")):
        logs = os.path.join(args.output, "logs")
        run_command(["nnunet-ext", "plan", "-d", str(args.d), "-pl", PLANNER, "-np", "2"],
                    env, os.path.join(logs, "plan.log"))
        run_command(["nnUNetv2_preprocess", "-d", str(args.d), "-plans_name", PLANS, "-c", CONFIGURATION,
                     "-np", "2"], env, os.path.join(logs, "preprocess.log"))
    else:
        log(f"using existing preprocessed data in {preprocessed}", "demo")
    if any(t.startswith("ss") for t in args.trainers):  # skips cases already done
        run_command(["nnunet-ext", "preprocess-unlabeled", "-d", str(args.d), "-p", PLANS, "-c", CONFIGURATION,
                     "-np", "2"], env, os.path.join(args.output, "logs", "preprocess_unlabeled.log"))
    return raw


def results_table(rows: dict[str, dict]) -> str:
    """Markdown table: one row per trainer, Dice and HD95 per region (mean over test cases)."""
    regions = list(next(iter(rows.values()))["summary"])
    head = "| trainer | " + " | ".join(f"Dice {r}" for r in regions) + " | " + \
        " | ".join(f"HD95 {r} (mm)" for r in regions) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(regions))]
    for name, result in rows.items():
        s = result["summary"]
        lines.append(f"| {name} | " + " | ".join(f"{s[r]['Dice']['mean']:.4f}" for r in regions) + " | " +
                     " | ".join(f"{s[r]['HD95']['mean']:.2f}" for r in regions) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Defaults run in under 10 minutes on 2 CPU cores."""
    parser.add_argument("--output", default="nnunet_ext_demo",
                        help="folder for data/results when nnUNet_* variables are unset, plus logs and "
                             "predictions (default ./%(default)s)")
    parser.add_argument("-d", type=int, default=DEFAULT_DATASET_ID, help="demo dataset id")
    parser.add_argument("--trainers", nargs="+", default=list(PAPER_MODELS),
                        help="trainer bases to compare (default: %(default)s)")
    parser.add_argument("--labels", type=int, default=6, help="label budget (default %(default)s)")
    parser.add_argument("--unlabeled", type=int, default=None,
                        help="unlabeled images for semi-supervised trainers (default: all available)")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10, help="training iterations per epoch")
    parser.add_argument("--num-train", type=int, default=20)
    parser.add_argument("--num-test", type=int, default=6)
    parser.add_argument("--num-unlabeled", type=int, default=16)
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("Z", "Y", "X"),
                        help="image size of the synthetic cases (patch >= 48 per axis is needed for CPC)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    """Run the whole demo and print the Dice table."""
    from nnunet_ext.evaluation.evaluate import evaluate_folder

    started = time.time()
    # fails on a bad name before any work
    names = [trainer_name(base, args.labels, args.unlabeled if base.startswith("ss") else None, args.epochs,
                          args.iters, mirroring=False) for base in args.trainers]
    args.output = os.path.abspath(args.output)
    env = demo_environment(args.output)
    log(f"writing to {args.output} (nnUNet_raw={env['nnUNet_raw']}, "
        f"nnUNet_results={env['nnUNet_results']})", "demo")
    raw = prepare_dataset(args, env)
    experiment = Experiment(args.d, os.path.basename(raw), dict(env, nnUNet_n_proc_DA=env.get("nnUNet_n_proc_DA", "0")),
                            os.path.join(args.output, "logs"), PLANS, CONFIGURATION, device="cpu")
    rows = {}
    for name in names:
        step = time.time()
        experiment.train(name, args.folds)
        predictions = experiment.predict(name, args.folds, os.path.join(raw, "imagesTs"),
                                         os.path.join(args.output, "predictions", name))
        rows[name] = evaluate_folder(os.path.join(raw, "labelsTs"), predictions,
                                     os.path.join(raw, "dataset.json"))
        log(f"{name}: trained {len(args.folds)} folds and predicted in {time.time() - step:.0f} s", "demo")
    table = results_table(rows)
    with open(os.path.join(args.output, "demo_results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.output, "demo_results.json"), "w") as f:
        json.dump({n: r["summary"] for n, r in rows.items()}, f, indent=2, default=str)
    print("\n" + table + "\n", flush=True)
    log(f"test-set metrics (BraTS empty-mask convention) written to {args.output}/demo_results.md", "demo")
    log(f"done in {time.time() - started:.0f} s", "demo")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
