"""Steps shared by the demo and the study runner: real nnUNetv2_* commands in subprocesses.

Each step is resumable: finished trainings are skipped, interrupted ones resume with ``--c``,
predictions continue where they stopped. Full command output goes to a log file; progress lines
are echoed.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from nnunet_ext import checkpoints, locks
from nnunet_ext.data.budgets import UNLABELED_IDS_FILE

# lines of nnU-Net's output worth echoing while a step runs
PROGRESS_MARKERS = ("Epoch ", "train_loss", "Pseudo dice", "Mean Validation Dice", "Label budget",
                    "Unlabeled pool", "Error", "Traceback")
# an exception as Python prints it last in a traceback, e.g. "ValueError: ..." or "torch.OutOfMemoryError: ..."
ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b(: |$)")


def log(message: str, prefix: str = "nnunet-ext") -> None:
    """Print a progress line immediately."""
    print(f"[{prefix}] {message}", flush=True)


def nnunet_environment(hint: str = "") -> dict[str, str]:
    """The current environment; raise ValueError naming nnU-Net's folder variables that are unset (``hint`` says
    what else the user may do)."""
    env = dict(os.environ)
    missing = [v for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results") if not env.get(v)]
    if missing:
        raise ValueError(f"set {', '.join(missing)} (nnU-Net's folders){hint}")
    return env


def local_environment(root: str) -> dict[str, str]:
    """nnU-Net's folder variables (kept when set, else created under ``root``) plus CPU-friendly settings."""
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env.setdefault(var, os.path.abspath(os.path.join(root, var)))
        os.makedirs(env[var], exist_ok=True)
    env.setdefault("nnUNet_def_n_proc", "2")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def failure_cause(lines: Sequence[str]) -> str | None:
    """The last exception line of a command's output (e.g. ``ValueError: Label budget 999 exceeds ...``), or None."""
    causes = [line.strip() for line in lines if ERROR_LINE.match(line)]
    return causes[-1] if causes else None


def run_command(cmd: list[str], env: dict[str, str], log_path: str, echo: bool = True) -> None:
    """Run a command, keep its full output in ``log_path`` and echo progress lines; fail loudly, with the
    exception that ended the command first in the error when its output names one."""
    log("$ " + " ".join(cmd))
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    last = collections.deque(maxlen=200)
    with open(log_path, "a", buffering=1) as log_file:
        proc = subprocess.Popen(cmd, env=locks.child_environment(env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log_file.write(line)
            last.append(line)
            if echo and any(m in line for m in PROGRESS_MARKERS):
                print("    " + line.rstrip()[:160], flush=True)
        if proc.wait() != 0:
            failed = f"command failed (exit {proc.returncode}): {' '.join(cmd)}; see {log_path}"
            cause = failure_cause(last)
            raise RuntimeError(f"{cause} ({failed})" if cause else failed)


@dataclass
class Experiment:
    """Where one dataset/plans/configuration lives, and the environment that runs nnU-Net on it."""

    dataset_id: int
    dataset_name: str
    env: dict[str, str]
    log_folder: str
    plans: str = "nnUNetPlans"
    configuration: str = "3d_fullres"
    device: str = "cuda"

    def result_folder(self, trainer: str) -> str:
        """nnU-Net's ``{trainer}__{plans}__{configuration}`` folder."""
        return os.path.join(self.env["nnUNet_results"], self.dataset_name,
                            f"{trainer}__{self.plans}__{self.configuration}")

    def plans_file(self) -> str:
        """The plans every trainer is given: ``$nnUNet_preprocessed/<dataset>/<plans>.json``."""
        return os.path.join(self.env["nnUNet_preprocessed"], self.dataset_name, f"{self.plans}.json")

    def trained_plans(self, trainer: str) -> tuple[str, str]:
        """The plans name and the norm (class name, ``none`` without one) the trainer's network was built with,
        from the ``plans.json`` nnU-Net writes into its result folder at training start (CPC trainers write
        their GroupNorm copy there); empty strings before any training."""
        from nnunet_ext.planners.groupnorm import norm_op_of

        path = os.path.join(self.result_folder(trainer), "plans.json")
        if not os.path.isfile(path):
            return "", ""
        with open(path) as f:
            plans = json.load(f)
        norm = norm_op_of(plans, self.configuration)
        return plans.get("plans_name", self.plans), "none" if norm is None else norm.rsplit(".", 1)[-1]

    def unlabeled_used(self, trainer: str, folds: Sequence[int]) -> tuple[int, ...]:
        """Per fold, how many unlabeled images the trainer trained with (its ``unlabeled_cases.json``); empty for
        supervised trainers, or when a fold's file is missing (e.g. trained elsewhere)."""
        counts = []
        for fold in folds:
            path = os.path.join(self.result_folder(trainer), f"fold_{fold}", UNLABELED_IDS_FILE)
            if not os.path.isfile(path):
                return ()
            with open(path) as f:
                counts.append(len(json.load(f)["unlabeled"]))
        return tuple(counts)

    def is_trained(self, trainer: str, fold: int) -> bool:
        """True when the fold finished training and nnU-Net's final validation. A finished fold whose final
        checkpoint another trainer wrote (a renamed or copied result folder) raises
        :class:`~nnunet_ext.checkpoints.ForeignCheckpointError` instead of passing as trained: it would fail at
        prediction, or predict with the other trainer. (An unfinished one is refused by the trainer on ``--c``.)"""
        fold_folder = os.path.join(self.result_folder(trainer), f"fold_{fold}")
        if not os.path.isfile(os.path.join(fold_folder, "validation", "summary.json")):
            return False
        final = os.path.join(fold_folder, "checkpoint_final.pth")
        if os.path.isfile(final):
            checkpoints.check_written_by(checkpoints.written_by(final), final, trainer)
            check_trained_rule(trainer, final)
        return True

    def train_command(self, trainer: str, fold: int) -> list[str]:
        """The nnUNetv2_train command of one fold (``--c`` resumes, or starts when nothing exists)."""
        return ["nnUNetv2_train", str(self.dataset_id), self.configuration, str(fold), "-p", self.plans,
                "-tr", trainer, "-device", self.device, "--c"]

    def predict_command(self, trainer: str, folds: list[int], images: str, output: str,
                        *extra: str) -> list[str]:
        """The nnUNetv2_predict command of a fold ensemble (on CPU without worker processes, ``-npp 0 -nps 0``:
        nnU-Net's sequential mode, which spares the processes' start-up on small cases)."""
        workers = "0" if self.device == "cpu" else "1"
        return ["nnUNetv2_predict", "-i", images, "-o", output, "-d", str(self.dataset_id),
                "-c", self.configuration, "-p", self.plans, "-tr", trainer, "-f", *map(str, folds),
                "-device", self.device, "-npp", workers, "-nps", workers, "--continue_prediction", *extra]

    def train_log(self, trainer: str, fold: int) -> str:
        """Where the training output of one fold is logged."""
        return os.path.join(self.log_folder, f"train_{trainer}_fold{fold}.log")

    def predict_log(self, trainer: str) -> str:
        """Where the prediction output of a trainer is logged."""
        return os.path.join(self.log_folder, f"predict_{trainer}.log")

    def training_lock(self, trainer: str, fold: int) -> contextlib.AbstractContextManager:
        """The lock that keeps a second run from training this fold into the same result folder while one does
        (:mod:`nnunet_ext.locks`; a killed run's lock is taken over). The trainer takes the same lock; the
        ``nnUNetv2_train`` that :func:`run_command` starts under it works under this run's (``locks.HOLDER_ENV``)."""
        folder = os.path.join(self.result_folder(trainer), f"fold_{fold}")
        return locks.held(os.path.join(folder, locks.LOCK_FILE), f"training fold {fold} of {trainer} ({folder})")

    def train(self, trainer: str, folds: list[int]) -> None:
        """Train the given folds, skipping finished ones, each under its :meth:`training_lock`."""
        for fold in folds:
            with self.training_lock(trainer, fold):
                if self.is_trained(trainer, fold):
                    log(f"{trainer} fold {fold}: already trained, skipping")
                    continue
                run_command(self.train_command(trainer, fold), self.env, self.train_log(trainer, fold))

    def predict(self, trainer: str, folds: list[int], images: str, output: str) -> str:
        """Predict ``images`` with the fold ensemble into ``output``."""
        run_command(self.predict_command(trainer, folds, images, output), self.env, self.predict_log(trainer),
                    echo=False)
        return output


def check_trained_rule(trainer: str, final: str) -> None:
    """Raise :class:`~nnunet_ext.trainers.multitask.BranchRuleMismatchError` when the finished checkpoint ``final``
    of a branch trainer was trained under another branch rule than the trainer's current one (a default changed
    since, e.g. ssCPCSeg's on 2026-12-08): reported as ``trainer``, it would stand beside folds trained under the
    current rule. Names outside our trainer grammar are left alone."""
    from nnunet_ext.trainers.names import BASES, TrainerNameError, parse_trainer_name, trainer_class

    try:
        base = parse_trainer_name(trainer).base
    except TrainerNameError:
        return
    if base not in BASES:
        return
    from nnunet_ext.trainers.multitask import BranchRuleMismatchError, MultiTaskTrainer

    cls = trainer_class(trainer)
    if not issubclass(cls, MultiTaskTrainer):
        return
    rule = cls.rule_of_checkpoint(checkpoints.entry(final, "branch_rule"))
    if rule is not None and not cls.follows(rule):
        raise BranchRuleMismatchError(
            f"{final} was trained with branch {rule.describe()}, but {trainer} now trains with another rule (its "
            f"default changed; docs/study.md, \"CPC stability\"): reported as {trainer} it would stand beside folds "
            f"trained under the current rule. Move {os.path.dirname(os.path.dirname(final))} away to train it again "
            f"(the paper's constant weight is ssCPCSegConstTrainer), or report it from the run that trained it.")
