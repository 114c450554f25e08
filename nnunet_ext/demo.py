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
from collections.abc import Sequence

from nnunet_ext.datasets.prepare import DEMO, PLANS, ROOT, prepare_synthetic_dataset
from nnunet_ext.evaluation.report import markdown_table, summary_case_results
from nnunet_ext.files import write_text_atomic
from nnunet_ext.pipeline import Experiment, local_environment, log
from nnunet_ext.trainers.names import PAPER_MODELS, is_semi_supervised, parse_trainer_name, trainer_name


def prepare_dataset(args: argparse.Namespace, env: dict[str, str]) -> str:
    """Write the demo dataset (unless present), plan it with the CPU GroupNorm planner and preprocess it (and its
    unlabeled images when a semi-supervised trainer is compared); return its raw folder."""
    return prepare_synthetic_dataset(env, args.d, DEMO.configuration, os.path.join(args.output, "logs"),
                                     unlabeled=any(map(is_semi_supervised, args.trainers)), planner=DEMO.planner,
                                     plans=DEMO.plans, num_train=args.num_train, num_test=args.num_test,
                                     num_unlabeled=args.num_unlabeled, shape=args.shape, seed=args.seed)


def results_table(rows: dict[str, dict], experiment: Experiment | None = None, folds: Sequence[int] = ()) -> str:
    """The study's Table 1 (``report.markdown_table``) of the demo's trainers: Dice and HD95 per region, mean over
    the test cases, under the convention of the summaries (``rows``: trainer name -> ``evaluate_folder``); with
    the ``experiment`` that trained ``folds``, also the unlabeled images and the plans and norm each trainer
    trained with (read from its result folder, as the study does)."""
    cases = []
    for name, summary in rows.items():
        spec = parse_trainer_name(name)
        trained = (experiment.unlabeled_used(name, folds), *experiment.trained_plans(name)) if experiment else ()
        cases += summary_case_results(summary, name, spec.base.removesuffix("Trainer"), spec.labels, spec.unlabeled,
                                      folds, 0, *trained)
    return markdown_table(cases, policy=cases[0].policy)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Defaults run in under 10 minutes on 2 CPU cores (528 s measured from an empty folder, README)."""
    parser.add_argument("--output", default=ROOT,
                        help="folder for data/results when nnUNet_* variables are unset, plus logs and "
                             "predictions (default ./%(default)s)")
    parser.add_argument("-d", type=int, default=DEMO.dataset_id, help="demo dataset id")
    parser.add_argument("--trainers", nargs="+", default=list(PAPER_MODELS),
                        help="trainer bases to compare (default: %(default)s)")
    parser.add_argument("--labels", type=int, default=6, help="label budget (default %(default)s)")
    parser.add_argument("--unlabeled", type=int, default=None,
                        help="unlabeled images for semi-supervised trainers (default: all available)")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5, help="training iterations per epoch")
    parser.add_argument("--num-train", type=int, default=DEMO.data["num_train"])
    parser.add_argument("--num-test", type=int, default=DEMO.data["num_test"])
    parser.add_argument("--num-unlabeled", type=int, default=DEMO.data["num_unlabeled"])
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEMO.data["shape"]), metavar=("Z", "Y", "X"),
                        help="image size of the synthetic cases (patch >= 48 per axis is needed for CPC)")
    parser.add_argument("--seed", type=int, default=DEMO.data["seed"])


def run(args: argparse.Namespace) -> int:
    """Run the whole demo and print the Dice table."""
    from nnunet_ext.evaluation.evaluate import evaluate_folder

    started = time.time()
    # fails on a bad name before any work
    names = [trainer_name(base, args.labels, args.unlabeled if is_semi_supervised(base) else None, args.epochs,
                          args.iters, mirroring=False) for base in args.trainers]
    args.output = os.path.abspath(args.output)
    env = local_environment(args.output)
    log(f"writing to {args.output} (nnUNet_raw={env['nnUNet_raw']}, "
        f"nnUNet_results={env['nnUNet_results']})", "demo")
    raw = prepare_dataset(args, env)
    experiment = Experiment(args.d, os.path.basename(raw), dict(env, nnUNet_n_proc_DA=env.get("nnUNet_n_proc_DA", "0")),
                            os.path.join(args.output, "logs"), PLANS, DEMO.configuration, device="cpu")
    rows = {}
    for name in names:
        step = time.time()
        experiment.train(name, args.folds)
        predictions = experiment.predict(name, args.folds, os.path.join(raw, "imagesTs"),
                                         os.path.join(args.output, "predictions", name))
        rows[name] = evaluate_folder(os.path.join(raw, "labelsTs"), predictions,
                                     os.path.join(raw, "dataset.json"))
        log(f"{name}: trained {len(args.folds)} folds and predicted in {time.time() - step:.0f} s", "demo")
    table = results_table(rows, experiment, args.folds)
    write_text_atomic(os.path.join(args.output, "demo_results.md"), table + "\n")
    write_text_atomic(os.path.join(args.output, "demo_results.json"),
                      json.dumps({n: r["summary"] for n, r in rows.items()}, indent=2, default=str))
    print("\n" + table + "\n", flush=True)
    log(f"test-set metrics (BraTS empty-mask convention) written to {args.output}/demo_results.md", "demo")
    log(f"done in {time.time() - started:.0f} s", "demo")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
