"""Label-efficiency study: train a grid of trainers x label budgets, predict the test split, report.

Each grid cell (trainer base, label budget, and for ss* trainers an unlabeled count) is one nnU-Net
trainer name such as ``CPCSegTrainer_6labels_300epochs``, trained fold by fold with the real
``nnUNetv2_train``, then the fold ensemble predicts the labeled test split (``imagesTs``) with
``nnUNetv2_predict`` and is evaluated against ``labelsTs`` (BraTS empty-mask convention). A ``PseudoLabel``
cell trains each fold through ``nnunet-ext self-train`` (:mod:`nnunet_ext.selftrain`): its teacher (the
EncDec cell of the same budget and seed, reused when the grid has it), the teacher's pseudo labels of the
fold's unlabeled pool, then the student. Writes into
``--output`` (default ``$nnUNet_results/DatasetXXX_NAME/study``): ``results.csv``, ``results.md``
(Table 1), ``fig2_dice_vs_labels.png``, ``fig4_dice_vs_unlabeled.png`` (ss trainers with several
``--unlabeled``), ``training_curves.md``/``.png`` (each fold's validation pseudo Dice: has it levelled off over the
last fifth?), ``study_status.json``, ``logs/`` and ``predictions/<trainer>/folds_<F>/``. The tables name
the plans and norm each cell trained with (its result folder's ``plans.json``).

Label budgets larger than the training cases of a study fold (nnU-Net's ``splits_final.json``, or the 5-fold
split it would make) are refused before anything trains. The study compares like with like: CPC trainers train
the GroupNorm copy of instance- or batch-norm plans, so a grid that mixes them with other trainers on such plans
is refused before anything trains, with the GroupNorm plans to make and use instead.

Resumable: trained folds are skipped, an interrupted training resumes (``--c``), a cell whose
evaluation summary exists is not predicted again. Before predicting, every test image is checked
(:func:`nnunet_ext.images.check_file`) and every prediction left by an earlier run is reused only when it
is readable, complete, on its input image's voxel grid, holds only dataset.json labels and is newer than
its input images and the checkpoints; any other is moved to ``rejected/`` in the prediction folder and
predicted again. A failing cell is logged (with its log file),
recorded as failed in ``study_status.json`` with its cause (the exception that ended its command), which the
console repeats at the end, and the grid goes on; the exit code is 1 if any cell
failed. ``--dispatch print`` prints the remaining commands (train per fold, predict, evaluate) one per
line for any scheduler; ``--dispatch submitit`` submits the remaining training folds as SLURM jobs
(rerun with ``--dispatch local`` afterwards to predict, evaluate and report).

One run at a time: a run holds a lock on its output folder, and each training fold a lock in its nnU-Net result
folder (:mod:`nnunet_ext.locks`: pid and host recorded, a killed run's lock taken over), so a second run on the
same folder is refused naming the run that holds it, and a second study on the same result folders (or a plain
``nnUNetv2_train`` of a fold it trains: the trainer takes the same lock) fails the cell whose fold is being
trained instead of training it twice.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass, replace

from nnunet_ext import files, locks, pipeline
from nnunet_ext.datasets import prepare
from nnunet_ext.evaluation import curves
from nnunet_ext.evaluation.metrics import EMPTY_POLICIES
from nnunet_ext.evaluation.report import CaseResult, markdown_table, summary_case_results, write_report
from nnunet_ext.pipeline import Experiment, log
from nnunet_ext.trainers.names import BASES, PAPER_MODELS, TrainerNameError, is_semi_supervised, trainer_name

DISPATCH = ("local", "print", "submitit")
CPC_MODULE = "nnunet_ext.trainers.cpc"  # its trainers train the GroupNorm copy of instance- or batch-norm plans
SELF_TRAINED = "PseudoLabel"  # cells of this model train through `nnunet-ext self-train` (teacher first)
PRETRAINED = "+pretrained"  # --pretrained: the model of a cell that starts from the checkpoint, e.g. EncDec+pretrained
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")  # what nnU-Net's --c resumes
STATUS_FILE = "study_status.json"
# option defaults; a --preset replaces those the user did not give (see preset_options)
DEFAULTS = {"plans": "nnUNetPlans", "configuration": "3d_fullres", "device": "cuda", "folds": [0, 1, 2, 3, 4],
            "no_mirroring": False, "repeats": 1, "baseline": "EncDec"}
PRESETS = {
    "cpu-smoke": {"trainers": list(PAPER_MODELS), "labels": [3, 6], "folds": [0], "epochs": 2, "iters": 5,
                  "no_mirroring": True, "device": "cpu"},
    # does the paper's ordering hold on CPU? Fixed before any of its results were seen (docs/study.md): 2D
    # GroupNorm CPU plans of a synthetic dataset whose many unlabeled images show more brain, tumour and
    # scanner variety than 3 or 6 labeled cases can; 3 seeded repeats of each cell, one fold, 500 iterations
    # without mirroring (cut from 1000 mirrored iterations after the first cell took 7 minutes, before any
    # comparison was seen: the grid must fit one working session)
    "cpu-evidence": {"trainers": ["EncDec", "CPCSeg", "ssCPCSeg", "ssVAESeg"], "labels": [3, 6], "repeats": 3,
                     "folds": [0], "epochs": 10, "iters": 50, "no_mirroring": True, "device": "cpu"},
    # the same schedule on the same recipe drawn with another seed, 5 repeats: where the CPC weight ramp decided on
    # cpu-evidence is confirmed without retuning (docs/study.md, "CPC stability")
    "cpu-evidence-confirm": {"trainers": ["EncDec", "CPCSeg", "ssCPCSeg"], "labels": [3, 6], "repeats": 5,
                             "folds": [0], "epochs": 10, "iters": 50, "no_mirroring": True, "device": "cpu"},
    # where a regularizer can pay off: 96-voxel patch edges (five CPC positions on the prediction axis, not three)
    # and a schedule at which EncDec's validation pseudo Dice has plateaued at 6 labels (docs/study.md); the
    # number of epochs was fixed from EncDec's curve alone, before any comparison was seen
    "cpu-evidence-96": {"trainers": ["EncDec", "CPCSeg", "ssCPCSeg", "MeanTeacher"], "labels": [6], "repeats": 5,
                        "folds": [0], "epochs": 40, "iters": 50, "no_mirroring": True, "device": "cpu"},
}
# the same grid on the 96 recipe drawn with another seed, nothing retuned
PRESETS["cpu-evidence-96-confirm"] = dict(PRESETS["cpu-evidence-96"])
# the synthetic dataset each preset writes, plans and preprocesses in prepare.ROOT
PRESET_DATA = {"cpu-smoke": prepare.DEMO, "cpu-evidence": prepare.EVIDENCE,
               "cpu-evidence-confirm": prepare.EVIDENCE_CONFIRM, "cpu-evidence-96": prepare.EVIDENCE_96,
               "cpu-evidence-96-confirm": prepare.EVIDENCE_96_CONFIRM}
# options that must keep the preset's value, as they choose its data (the smoke preset writes the demo data under
# any -d; the evidence presets' datasets were fixed with their ids, docs/study.md)
PRESET_FIXED = {"cpu-smoke": ("plans", "configuration"), "cpu-evidence": ("d", "plans", "configuration"),
                "cpu-evidence-confirm": ("d", "plans", "configuration"),
                "cpu-evidence-96": ("d", "plans", "configuration"),
                "cpu-evidence-96-confirm": ("d", "plans", "configuration")}
OPTION_FLAGS = {"d": "-d", "plans": "-p", "configuration": "-c"}


@dataclass(frozen=True)
class Cell:
    """One trained unit of the grid: model (short base name), label budget, unlabeled count, repeat, and its
    trainer name (with ``_s<repeat>`` when the study has several repeats); ``pretrained``: starts from the study's
    ``--pretrained`` checkpoint (its twin without starts from scratch, same seed and labeled cases)."""

    model: str
    labels: int
    unlabeled: int | None
    trainer: str
    repeat: int = 0
    pretrained: bool = False

    @property
    def name(self) -> str:
        """The cell in logs, ``study_status.json`` and ``predictions/``: its trainer (``+pretrained`` when
        pretrained)."""
        return self.trainer + PRETRAINED if self.pretrained else self.trainer

    @property
    def label(self) -> str:
        """The cell's model in the tables: its model, ``+pretrained`` when pretrained (e.g. ``EncDec+pretrained``)."""
        return self.model + PRETRAINED if self.pretrained else self.model


def available_models() -> list[str]:
    """Short names of all trainer bases (``EncDecTrainer`` -> ``EncDec``)."""
    return [base.removesuffix("Trainer") for base in BASES]


def trainer_base(model: str) -> str:
    """Return the trainer base of a ``--trainers`` entry; raise ValueError for an unknown one."""
    base = model if model.endswith("Trainer") else model + "Trainer"
    if base in BASES:
        return base
    raise ValueError(f"--trainers: '{model}' is not a trainer base; available: {', '.join(available_models())} "
                     f"(give base names; label budgets come from --labels and --unlabeled)")


def build_grid(models: Sequence[str], labels: Sequence[int], unlabeled: Sequence[int] | None = None,
               epochs: int | None = None, iters: int | None = None, mirroring: bool = True,
               repeats: int = 1) -> list[Cell]:
    """Return the cells in order model, labels, unlabeled, repeat; ``unlabeled`` applies to ss trainers only.
    With several repeats, repeat K trains ``..._s<K>`` (seed K, K-th labeled subset); one repeat keeps the
    plain name."""
    bases = list(dict.fromkeys(trainer_base(m) for m in models))
    cells = []
    for base in bases:
        counts = list(dict.fromkeys(unlabeled)) if is_semi_supervised(base) and unlabeled else [None]
        for n in dict.fromkeys(labels):
            for m in counts:
                for repeat in range(repeats):
                    try:
                        name = trainer_name(base, n, m, epochs, iters, mirroring, repeat if repeats > 1 else None)
                    except TrainerNameError as error:
                        raise ValueError(f"--labels/--unlabeled/--epochs/--iters give an invalid trainer: "
                                         f"{error}") from error
                    cells.append(Cell(base.removesuffix("Trainer"), n, m, name, repeat))
    return cells


def with_pretrained_twins(cells: Sequence[Cell]) -> list[Cell]:
    """The cells, then each again starting from ``--pretrained`` (paired: same trainer, seed and labeled cases)."""
    self_trained = sorted({c.model for c in cells if c.model == SELF_TRAINED})
    if self_trained:
        raise ValueError(f"--pretrained: {' '.join(self_trained)} cells train through `nnunet-ext self-train`, which "
                         f"takes no pretrained weights; leave {' '.join(self_trained)} out of --trainers")
    return list(cells) + [replace(c, pretrained=True) for c in cells]


@dataclass
class Study:
    """Where a study's cells are trained, predicted and evaluated, and the commands that do it. With
    ``pretrained`` (a checkpoint), pretrained cells train in ``pretrained_experiment``: the same plans under another
    name (:func:`nnunet_ext.pretrained.write_twin_plans`), so they get their own nnU-Net result folders."""

    experiment: Experiment
    raw: str
    output: str
    folds: list[int]
    num_gpus: int | None = None
    metrics: tuple[str, ...] = ()  # ``nnunet-ext evaluate --metrics`` beyond Dice and HD95
    pretrained: str | None = None
    pretrained_experiment: Experiment | None = None

    def experiment_of(self, cell: Cell) -> Experiment:
        """Where the cell trains: the study's experiment, or for a pretrained cell the pretrained one."""
        return self.pretrained_experiment if cell.pretrained else self.experiment

    def fold_tag(self) -> str:
        """The fold set as a folder name, e.g. ``folds_0_1``."""
        return "folds_" + "_".join(map(str, self.folds))

    def prediction_folder(self, cell: Cell) -> str:
        """Predictions of the cell's fold ensemble on the test split."""
        return os.path.join(self.output, "predictions", cell.name, self.fold_tag())

    def summary_path(self, cell: Cell, policy: str = EMPTY_POLICIES[0]) -> str:
        """The evaluation summary of one empty-mask convention; all of them mark a finished cell."""
        return os.path.join(self.prediction_folder(cell), f"summary_{policy}.json")

    def is_evaluated(self, cell: Cell) -> bool:
        """True when the cell's predictions are evaluated under every empty-mask convention with every metric."""
        return all(os.path.isfile(self.summary_path(cell, policy)) and self.has_metrics(self.summary_path(cell, policy))
                   for policy in EMPTY_POLICIES)

    def has_metrics(self, summary: str) -> bool:
        """True when a summary holds every metric of ``metrics`` (an earlier evaluation may lack some)."""
        if not self.metrics:
            return True
        with open(summary) as f:
            return set(self.metrics) <= set(json.load(f).get("extra_metrics", []))

    def pending_folds(self, cell: Cell) -> list[int]:
        """The folds of the cell that have not finished training."""
        return [f for f in self.folds if not self.experiment_of(cell).is_trained(cell.trainer, f)]

    def has_checkpoint(self, cell: Cell, fold: int) -> bool:
        """Whether the fold has a checkpoint that nnU-Net's ``--c`` resumes."""
        folder = os.path.join(self.experiment_of(cell).result_folder(cell.trainer), f"fold_{fold}")
        return any(os.path.isfile(os.path.join(folder, name)) for name in CHECKPOINTS)

    def train_command(self, cell: Cell, fold: int) -> list[str]:
        """``nnUNetv2_train`` of one fold, with ``-num_gpus`` when asked for; for a pseudo-label student
        ``nnunet-ext self-train`` of the fold (its teacher, pseudo labels, then the student). A pretrained cell's
        fold starts with ``-pretrained_weights`` (nnU-Net refuses it with ``--c``) until it has a checkpoint to
        resume."""
        gpus = [] if self.num_gpus is None else ["-num_gpus", str(self.num_gpus)]
        if cell.model == SELF_TRAINED:
            e = self.experiment
            return ["nnunet-ext", "self-train", "-d", str(e.dataset_id), "-tr", cell.trainer, "-f", str(fold),
                    "-p", e.plans, "-c", e.configuration, "-device", e.device] + gpus
        command = self.experiment_of(cell).train_command(cell.trainer, fold) + gpus
        if cell.pretrained and not self.has_checkpoint(cell, fold):
            command = [a for a in command if a != "--c"] + ["-pretrained_weights", self.pretrained]
        return command

    def predict_command(self, cell: Cell) -> list[str]:
        """``nnUNetv2_predict`` of the fold ensemble on ``imagesTs``."""
        return self.experiment_of(cell).predict_command(cell.trainer, self.folds, os.path.join(self.raw, "imagesTs"),
                                                        self.prediction_folder(cell))

    def evaluate_commands(self, cell: Cell) -> list[list[str]]:
        """``nnunet-ext evaluate`` of the cell's predictions, one per empty-mask convention (with ``metrics``
        replacing a summary that lacks them)."""
        return [["nnunet-ext", "evaluate", os.path.join(self.raw, "labelsTs"), self.prediction_folder(cell),
                 "-djfile", os.path.join(self.raw, "dataset.json"), "-o", self.summary_path(cell, policy), "-np",
                 "1", "--empty-policy", policy, *(["--metrics", *self.metrics, "--overwrite"] if self.metrics else [])]
                for policy in EMPTY_POLICIES]


def run_cell(study: Study, cell: Cell, progress: str) -> dict:
    """Train, predict and evaluate one cell, skipping finished steps; return its status entry."""
    from nnunet_ext.evaluation.evaluate import evaluate_folder

    log_path, experiment = None, study.experiment_of(cell)
    try:
        for fold in study.folds:
            with experiment.training_lock(cell.trainer, fold):
                if experiment.is_trained(cell.trainer, fold):
                    log(f"{cell.name} fold {fold}: already trained, skipping", progress)
                    continue
                log_path = experiment.train_log(cell.trainer, fold)
                log(f"{cell.name} fold {fold}: training (log: {log_path})", progress)
                pipeline.run_command(study.train_command(cell, fold), experiment.env, log_path)
        if study.is_evaluated(cell):
            log(f"{cell.name}: already evaluated, skipping prediction", progress)
            return {"state": "done", "summary": study.summary_path(cell)}
        reject_stale_predictions(study, cell, progress)
        log_path = experiment.predict_log(cell.trainer)
        log(f"{cell.name}: predicting imagesTs with folds {' '.join(map(str, study.folds))}", progress)
        pipeline.run_command(study.predict_command(cell), experiment.env, log_path, echo=False)
        log_path = None
        for policy in EMPTY_POLICIES:
            evaluate_folder(os.path.join(study.raw, "labelsTs"), study.prediction_folder(cell),
                            os.path.join(study.raw, "dataset.json"), study.summary_path(cell, policy), policy,
                            extra_metrics=study.metrics)
    except Exception as error:  # one failing cell must not stop the grid
        log(f"{cell.name}: FAILED: {error}" + (f" (log: {log_path})" if log_path else ""), progress)
        return {"state": "failed", "error": str(error), "log": log_path}
    log(f"{cell.name}: done", progress)
    return {"state": "done", "summary": study.summary_path(cell)}


def reject_stale_predictions(study: Study, cell: Cell, progress: str) -> None:
    """Check the test images, then move every earlier prediction of the cell that must not be reused into
    ``rejected/`` (``nnUNetv2_predict --continue_prediction`` would keep it), saying why."""
    from nnunet_ext.data.raw_cases import raw_cases
    from nnunet_ext.evaluation import evaluate
    from nnunet_ext.images import check_file

    dataset = evaluate.load_dataset_json(os.path.join(study.raw, "dataset.json"))
    ending = dataset["file_ending"]
    inputs = raw_cases(os.path.join(study.raw, "imagesTs"), ending, len(dataset["channel_names"]))
    for case_files in inputs.values():
        for f in case_files:
            check_file(f)
    folder = study.prediction_folder(cell)
    predictions = sorted(f for f in os.listdir(folder) if f.endswith(ending)) if os.path.isdir(folder) else []
    values = evaluate.label_values(evaluate.regions_from_dataset_json(dataset), dataset["labels"].get("ignore"))
    checkpoints = [os.path.join(study.experiment_of(cell).result_folder(cell.trainer), f"fold_{fold}",
                                "checkpoint_final.pth") for fold in study.folds]
    for name in predictions:
        path, case = os.path.join(folder, name), name[:-len(ending)]
        reason = _stale_reason(path, inputs.get(case), checkpoints, values)
        if reason:
            os.makedirs(os.path.join(folder, "rejected"), exist_ok=True)
            os.replace(path, os.path.join(folder, "rejected", name))
            log(f"{cell.name}: predicting {case} again ({reason}; moved to rejected/)", progress)


def _stale_reason(path: str, inputs: list[str] | None, checkpoints: list[str], values: set[int]) -> str | None:
    """Why an earlier prediction must not be reused, or None when it may."""
    from nnunet_ext.evaluation.evaluate import read_label_map
    from nnunet_ext.images import read_geometry

    if inputs is None:
        return "no such case in imagesTs"
    newer = [f for f in inputs + checkpoints if os.path.isfile(f) and os.path.getmtime(f) > os.path.getmtime(path)]
    if newer:
        return f"older than {newer[0]}"
    try:
        differences = read_geometry(path).differences(read_geometry(inputs[0]))
        if differences:
            return f"{'; '.join(differences)} of its input {inputs[0]}"
        read_label_map(path, values)
    except ValueError as error:
        return str(error)
    return None


def update_status(path: str, cell: Cell, folds: list[int], entry: dict) -> None:
    """Record a cell's state in ``study_status.json`` (kept across runs, one entry per trainer)."""
    status = {}
    if os.path.isfile(path):
        with open(path) as f:
            status = json.load(f)
    status[cell.name] = {"model": cell.label, "labels": cell.labels, "unlabeled": cell.unlabeled,
                            "folds": folds, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **entry}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.write_json_atomic(path, status, indent=2)


def case_results(study: Study, cells: Sequence[Cell]) -> list[CaseResult]:
    """Read the per-case metrics of the evaluated cells (every empty-mask convention) for the report, with the
    unlabeled images, plans and norm each cell trained with (its result folder)."""
    results = []
    for cell in cells:
        if not study.is_evaluated(cell):
            continue
        experiment = study.experiment_of(cell)
        trained = (experiment.unlabeled_used(cell.trainer, study.folds), *experiment.trained_plans(cell.trainer))
        for policy in EMPTY_POLICIES:
            with open(study.summary_path(cell, policy)) as f:
                summary = json.load(f)
            results += summary_case_results(summary, cell.trainer, cell.label, cell.labels, cell.unlabeled,
                                            study.folds, cell.repeat, *trained)
    return results


def training_curves(study: Study, cells: Sequence[Cell]) -> list[curves.Curve]:
    """The validation pseudo Dice curve of every trained fold of the cells (its checkpoint's log), with the class or
    region names of the dataset.json nnU-Net copied into the cell's result folder. A fold whose curve cannot be read
    (a damaged checkpoint, a log that does not fit the names) is named in the console and left out."""
    found = []
    for cell in cells:
        folder = study.experiment_of(cell).result_folder(cell.trainer)
        dataset_json = os.path.join(folder, "dataset.json")
        if not os.path.isfile(dataset_json):
            continue
        with open(dataset_json) as f:
            names = curves.foreground_names(json.load(f))
        for fold in study.folds:
            try:
                curve = curves.read_curve(os.path.join(folder, f"fold_{fold}"), names, cell.label, cell.labels,
                                          cell.repeat, fold)
            except Exception as error:  # an unreadable curve must not cost the report of a finished grid
                log(f"{cell.name} fold {fold}: no training curve ({type(error).__name__}: {error})", "study")
                continue
            if curve is not None:
                found.append(curve)
    return found


def write_training_curves(study: Study, cells: Sequence[Cell]) -> list[str]:
    """``training_curves.md`` (last fifth vs the fifth before, per fold) and ``training_curves.png`` in the study
    folder; the paths written (none before any fold has a checkpoint)."""
    found = training_curves(study, cells)
    if not found:
        return []
    table = os.path.join(study.output, "training_curves.md")
    files.write_text_atomic(table, curves.plateau_table(found))
    return [table, curves.plot_curves(found, os.path.join(study.output, "training_curves.png"))]


def time_left(worked: Sequence[float], remaining: int) -> str:
    """Estimate of the time the ``remaining`` cells take, from the cells that trained or predicted so far."""
    if not worked or not remaining:
        return "0 s" if not remaining else "unknown"
    seconds = sum(worked) / len(worked) * remaining
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def run_local(study: Study, cells: Sequence[Cell], baseline: str = DEFAULTS["baseline"]) -> int:
    """Run the grid sequentially, write the report; return 1 if any cell failed, else 0."""
    status_path = os.path.join(study.output, STATUS_FILE)
    failed, worked = [], []
    for index, cell in enumerate(cells, 1):
        progress = f"study {index}/{len(cells)}"
        already = study.is_evaluated(cell)
        start = time.time()
        entry = run_cell(study, cell, progress)
        update_status(status_path, cell, study.folds, entry)
        if entry["state"] == "failed":
            failed.append(f"{cell.name}: {entry['error']}")
        if not already:
            worked.append(time.time() - start)
            remaining = sum(not study.is_evaluated(c) for c in cells[index:])
            log(f"{cell.name}: {worked[-1]:.0f} s; {remaining} cells to go, about "
                f"{time_left(worked, remaining)} left", progress)
    cases = case_results(study, cells)
    if cases:
        paths = write_report(cases, study.output, baseline=baseline)
        print("\n" + markdown_table(cases) + "\n", flush=True)
        log("wrote " + ", ".join([*paths.values(), *write_training_curves(study, cells)]), "study")
    if failed:
        log(f"{len(failed)} of {len(cells)} cells failed (details in {status_path}):\n  " + "\n  ".join(failed),
            "study")
        return 1
    log(f"all {len(cells)} cells done", "study")
    return 0


def print_commands(study: Study, cells: Sequence[Cell]) -> int:
    """Print the remaining commands of every cell, one per line (notes go to stderr); return 0."""
    for cell in cells:
        if study.is_evaluated(cell):
            print(f"# {cell.name}: already evaluated", file=sys.stderr)
            continue
        for fold in study.pending_folds(cell):
            print(shlex.join(study.train_command(cell, fold)))
        print(shlex.join(study.predict_command(cell)))
        for command in study.evaluate_commands(cell):
            print(shlex.join(command))
    return 0


def slurm_parameters(pairs: Sequence[str]) -> dict[str, int | str]:
    """Parse ``--slurm KEY=VALUE`` pairs (integers converted) for submitit's ``update_parameters``."""
    parameters: dict[str, int | str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--slurm: expected KEY=VALUE (e.g. timeout_min=2880), got '{pair}'")
        parameters[key] = int(value) if value.isdigit() else value
    return parameters


def load_submitit() -> types.ModuleType:
    """Import submitit (an optional dependency); raise ImportError saying how to install it."""
    try:
        import submitit
    except ImportError as error:
        raise ImportError("--dispatch submitit needs the submitit library: pip install submitit "
                          "(or use --dispatch print and submit the commands yourself)") from error
    return submitit


def submit_cells(study: Study, cells: Sequence[Cell], slurm: dict[str, int | str], resubmit: bool = False) -> int:
    """Submit every pending training fold as a SLURM job through submitit; return 0.

    A fold that ``study_status.json`` records as submitted is not submitted again (its job may still be
    queued or running) unless ``resubmit``. Jobs inherit the job's environment (sbatch exports the
    submitting shell's by default), so SLURM's own variables such as ``CUDA_VISIBLE_DEVICES`` stay intact.
    """
    submitit = load_submitit()
    executor = submitit.AutoExecutor(folder=os.path.join(study.output, "submitit"), cluster="slurm")
    executor.update_parameters(**{"gpus_per_node": study.num_gpus or 1, **slurm})
    status_path = os.path.join(study.output, STATUS_FILE)
    status = {}
    if os.path.isfile(status_path):
        with open(status_path) as f:
            status = json.load(f)
    for index, cell in enumerate(cells, 1):
        previous = status.get(cell.name, {})
        jobs = dict(previous.get("jobs", {})) if previous.get("state") == "submitted" else {}
        submitted = False
        for fold in study.pending_folds(cell):
            if str(fold) in jobs and not resubmit:
                log(f"{cell.name} fold {fold}: job {jobs[str(fold)]} was submitted before, not submitting "
                    f"again (--resubmit if it failed or was cancelled)", f"study {index}/{len(cells)}")
                continue
            function = submitit.helpers.CommandFunction(study.train_command(cell, fold))
            jobs[str(fold)] = executor.submit(function).job_id
            submitted = True
            log(f"{cell.name} fold {fold}: submitted job {jobs[str(fold)]}", f"study {index}/{len(cells)}")
        if submitted:
            update_status(status_path, cell, study.folds, {"state": "submitted", "jobs": jobs})
    log("when the jobs are done, rerun with --dispatch local to predict, evaluate and report", "study")
    return 0


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``nnunet-ext study`` arguments (unset options take the --preset's or the default value)."""
    parser.add_argument("-d", type=int, default=None, help="dataset id (with imagesTs/labelsTs)")
    parser.add_argument("--trainers", nargs="+", default=None,
                        help=f"trainer bases by short name, e.g. {' '.join(PAPER_MODELS)} "
                             f"(available: {' '.join(available_models())})")
    parser.add_argument("--labels", type=positive_int, nargs="+", default=None, help="label budgets, e.g. 3 6 12")
    parser.add_argument("--unlabeled", type=positive_int, nargs="+", default=None,
                        help="unlabeled counts for ss* trainers (ignored by the others; default: all available)")
    parser.add_argument("--folds", type=int, nargs="+", default=None, help="folds to train and ensemble "
                        f"(default {' '.join(map(str, DEFAULTS['folds']))})")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="train every cell R times (trainer suffix _s0.._s<R-1>: seed and labeled subset of "
                             "each repeat) for mean ± std and paired statistics (default 1, no suffix)")
    parser.add_argument("--baseline", default=None,
                        help=f"model the paired differences are computed against (default {DEFAULTS['baseline']})")
    parser.add_argument("--epochs", type=positive_int, default=None, help="epochs (default: nnU-Net's 1000)")
    parser.add_argument("--iters", type=positive_int, default=None, help="iterations per epoch (default 250)")
    parser.add_argument("--no-mirroring", action="store_true", default=None,
                        help="no mirroring augmentation and no test-time mirroring")
    parser.add_argument("-p", "--plans", default=None, help=f"plans identifier (default {DEFAULTS['plans']})")
    parser.add_argument("-c", "--configuration", default=None,
                        help=f"configuration (default {DEFAULTS['configuration']})")
    parser.add_argument("--pretrained", metavar="CKPT", default=None,
                        help="also train every cell from this checkpoint (e.g. an nnssl/OpenMind checkpoint_final.pth, "
                             "with plans made by `nnunet-ext plan --like-pretrained`): model <M>+pretrained, paired "
                             "with <M> (same seed and labeled cases); its trainings use the plans under the name "
                             "<plans>__pretrained_<sha256[:8]> (docs/baselines.md)")
    parser.add_argument("--metrics", nargs="+", default=[],
                        help="evaluate also these metrics of nnunet-ext evaluate --metrics (lesionwise, nsd, "
                             "hd95-surfels; docs/metrics.md); Table 1, results.csv and the paired tables gain them")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help=f"device (default {DEFAULTS['device']})")
    parser.add_argument("--num-gpus", type=positive_int, default=None,
                        help="GPUs per training, passed to nnUNetv2_train -num_gpus")
    parser.add_argument("--output", default=None,
                        help="folder for predictions, logs and results (default $nnUNet_results/DatasetXXX/study)")
    parser.add_argument("--dispatch", choices=DISPATCH, default="local",
                        help="local: run sequentially (default); print: print the commands; submitit: SLURM jobs")
    parser.add_argument("--slurm", nargs="+", default=[], metavar="KEY=VALUE",
                        help="submitit executor parameters, e.g. timeout_min=2880 slurm_partition=gpu")
    parser.add_argument("--resubmit", action="store_true",
                        help="with --dispatch submitit: submit unfinished folds again even if study_status.json "
                             "records a job for them (e.g. after a failed or cancelled job)")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="cpu-evidence: EncDec, CPCSeg, ssCPCSeg, ssVAESeg at 3 and 6 labels, 3 repeats, 2d "
                             "CPU plans of the synthetic BraTSVariety dataset, 10 x 50 iterations without mirroring "
                             "(docs/study.md; about 80 minutes on 2 cores). cpu-evidence-confirm: EncDec, CPCSeg, "
                             "ssCPCSeg at 3 and 6 labels, 5 repeats, on the same recipe drawn with another seed. "
                             "cpu-evidence-96: EncDec, CPCSeg, ssCPCSeg, MeanTeacher at 6 labels, 5 repeats, 96-voxel "
                             "patches, 40 x 50 iterations (docs/study.md, 'CPC stability'); "
                             "cpu-evidence-96-confirm: the same grid on that recipe drawn with another seed. "
                             "cpu-smoke: the demo dataset, the paper's six models, labels 3 6, fold 0, "
                             "2 epochs x 5 iterations on CPU (under 15 minutes on 2 cores)")


def preset_options(name: str) -> dict:
    """A preset's options, with the dataset id, plans and configuration of its synthetic data."""
    data = PRESET_DATA[name]
    return dict(PRESETS[name], d=data.dataset_id, plans=data.plans, configuration=data.configuration)


def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from the preset, then the defaults; check the required ones."""
    preset = preset_options(args.preset) if args.preset else {}
    for key, value in {**DEFAULTS, **preset}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    missing = [flag for flag, key in (("-d", "d"), ("--trainers", "trainers"), ("--labels", "labels"))
               if getattr(args, key) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or use --preset cpu-smoke)")
    if args.num_gpus and args.num_gpus > 1 and args.device != "cuda":
        raise ValueError(f"--num-gpus {args.num_gpus} needs --device cuda")
    return args


def study_environment(args: argparse.Namespace) -> dict[str, str]:
    """nnU-Net's environment: the current one, or for a preset the demo's (folders under prepare.ROOT when
    unset, process counts)."""
    if args.preset:
        return pipeline.local_environment(prepare.ROOT)
    env = pipeline.nnunet_environment(", or use --preset cpu-smoke")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def dataset_folder(raw_root: str, dataset_id: int) -> str:
    """Return ``raw_root/DatasetXXX_NAME`` of ``-d``; raise ValueError when it is missing or ambiguous."""
    prefix = f"Dataset{dataset_id:03d}_"
    found = sorted(n for n in os.listdir(raw_root) if n.startswith(prefix)) if os.path.isdir(raw_root) else []
    if len(found) != 1:
        raise ValueError(f"-d {dataset_id}: expected one {prefix}* folder in {raw_root}, found {found or 'none'}")
    return os.path.join(raw_root, found[0])


def prepare_preset_dataset(args: argparse.Namespace, env: dict[str, str]) -> None:
    """Write, plan and preprocess the synthetic dataset of ``--preset`` (:data:`PRESET_DATA`) when missing; raise
    ValueError when an option would give the preset other data."""
    expected, fixed = preset_options(args.preset), PRESET_FIXED[args.preset]
    if any(getattr(args, key) != expected[key] for key in fixed):
        given = " ".join(f"{OPTION_FLAGS[key]} {expected[key]}" for key in fixed)
        raise ValueError(f"--preset {args.preset} prepares {given}; drop {'/'.join(OPTION_FLAGS[k] for k in fixed)}")
    logs = os.path.join(os.path.abspath(prepare.ROOT), "logs")
    data = PRESET_DATA[args.preset]
    prepare.prepare_synthetic_dataset(env, args.d, args.configuration, logs,
                                      unlabeled=any(map(is_semi_supervised, args.trainers)), planner=data.planner,
                                      plans=data.plans, **data.data)


def check_dataset(study: Study) -> None:
    """Raise ValueError unless the test split and the plans exist."""
    for sub in ("imagesTs", "labelsTs"):
        if not os.path.isdir(os.path.join(study.raw, sub)):
            raise ValueError(f"{study.raw} has no {sub}/: the study predicts and evaluates the labeled test split "
                             f"(convert-msd and make-demo-dataset write one)")
    plans_file = study.experiment.plans_file()
    if not os.path.isfile(plans_file):
        raise ValueError(f"-p {study.experiment.plans}: {plans_file} does not exist; plan and preprocess the dataset "
                         f"first (nnunet-ext plan / nnUNetv2_plan_and_preprocess)")


def fold_training_sizes(study: Study) -> dict[int, int]:
    """Training cases of each study fold as nnU-Net splits them: its ``splits_final.json`` when written, else its
    seeded 5-fold split of dataset.json's ``numTraining`` cases; a fold beyond the splits gets nnU-Net's 80:20."""
    e = study.experiment
    splits_file = os.path.join(e.env["nnUNet_preprocessed"], e.dataset_name, "splits_final.json")
    if os.path.isfile(splits_file):
        with open(splits_file) as f:
            splits = json.load(f)
        sizes, total = [len(s["train"]) for s in splits], len(splits[0]["train"]) + len(splits[0]["val"])
    else:
        with open(os.path.join(study.raw, "dataset.json")) as f:
            total = int(json.load(f)["numTraining"])
        if total < 5:
            raise ValueError(f"{study.raw}: {total} training cases (dataset.json numTraining), but nnU-Net's 5-fold "
                             f"cross-validation needs at least 5; add labeled cases to imagesTr.")
        sizes = [total - total // 5 - (fold < total % 5) for fold in range(5)]  # KFold: first folds validate 1 more
    return {fold: sizes[fold] if fold < len(sizes) else int(total * 0.8) for fold in study.folds}


def check_budgets(cells: Sequence[Cell], study: Study) -> None:
    """Raise ValueError when a label budget exceeds the training cases of one of the study's folds."""
    sizes = fold_training_sizes(study)
    smallest = min(sizes, key=sizes.get)
    too_large = sorted({c.labels for c in cells if c.labels > sizes[smallest]})
    if too_large:
        raise ValueError(f"--labels {' '.join(map(str, too_large))}: fold {smallest} has only {sizes[smallest]} "
                         f"training cases (folds {' '.join(map(str, sizes))}: {' '.join(map(str, sizes.values()))}); "
                         f"choose budgets <= {sizes[smallest]}")


def trains_group_norm_copy(model: str) -> bool:
    """Whether a model's trainers train the GroupNorm copy of instance- or batch-norm plans (the CPC trainers)."""
    return BASES[trainer_base(model)][0] == CPC_MODULE


def group_norm_planner(plans: dict) -> tuple[str, str]:
    """Our GroupNorm twin of the planner that wrote ``plans`` and the plans identifier it writes; nnU-Net's default
    planner's twin (``nnUNetPlannerGN``, ``nnUNetGNPlans``) when it has none."""
    from nnunet_ext.planners.groupnorm import GroupNormPlansMixin, nnUNetPlannerGN

    used = plans.get("experiment_planner_used")
    twin = next((planner for planner in GroupNormPlansMixin.__subclasses__()
                 if any(base.__name__ == used for base in planner.__bases__)), nnUNetPlannerGN)
    return twin.__name__, twin.default_plans_name


def check_same_norm(cells: Sequence[Cell], experiment: Experiment) -> None:
    """Raise ValueError when the grid's CPC cells would train another norm than its other cells (CPC trainers train
    the GroupNorm copy of instance- or batch-norm plans, ``planners.groupnorm.group_norm_plans``), naming the
    GroupNorm plans to make and use; grids of CPC trainers only, or without one, may use any plans."""
    from nnunet_ext.planners.groupnorm import group_norm_plans, norm_op_of

    cpc = list(dict.fromkeys(c.model for c in cells if trains_group_norm_copy(c.model)))
    others = list(dict.fromkeys(c.model for c in cells if c.model not in cpc))
    if not cpc or not others:
        return
    with open(experiment.plans_file()) as f:
        plans = json.load(f)
    configuration = experiment.configuration
    norm = norm_op_of(plans, configuration)
    if norm_op_of(group_norm_plans(plans)[0], configuration) == norm:
        return
    planner, group_norm = group_norm_planner(plans)
    command = f"nnunet-ext plan -d {experiment.dataset_id} -pl {planner} --preprocess -c {configuration}"
    like = plans.get("nnunet_ext_like_pretrained")
    if like:  # plans like a pretrained checkpoint: keep its network, with GroupNorm
        from nnunet_ext.planners.like_pretrained import GROUP_NORM_PLANS_NAME

        command = (f"nnunet-ext plan -d {experiment.dataset_id} --like-pretrained {like['adaptation_plan']} "
                   f"--group-norm --preprocess")
        group_norm = GROUP_NORM_PLANS_NAME
    raise ValueError(f"--trainers {' '.join(cpc)} train the GroupNorm copy of -p {experiment.plans}, whose "
                     f"{configuration} networks use {norm.rsplit('.', 1)[-1]}, so {' '.join(others)} would be "
                     f"compared with another norm. Plan GroupNorm networks for every trainer with `{command}` and "
                     f"rerun with -p {group_norm} (or study the CPC trainers on their own)")


def make_study(args: argparse.Namespace) -> Study:
    """Resolve the environment, dataset and folders of a study from the parsed options."""
    env = study_environment(args)
    if args.preset:
        prepare_preset_dataset(args, env)
        env.setdefault("nnUNet_n_proc_DA", "0")  # like the demo; set after planning, which fails with 0
    raw = dataset_folder(env["nnUNet_raw"], args.d)
    name = os.path.basename(raw)
    output = os.path.abspath(args.output or os.path.join(env["nnUNet_results"], name, "study"))
    experiment = Experiment(args.d, name, env, os.path.join(output, "logs"), args.plans, args.configuration,
                            args.device)
    from nnunet_ext.evaluation.evaluate import check_extra_metrics

    check_extra_metrics(args.metrics)
    study = Study(experiment, raw, output, list(dict.fromkeys(args.folds)), args.num_gpus,
                  tuple(dict.fromkeys(args.metrics)))
    check_dataset(study)
    if args.pretrained:
        study.pretrained, study.pretrained_experiment = pretrained_experiment(study, args.pretrained)
    return study


def pretrained_experiment(study: Study, checkpoint: str) -> tuple[str, Experiment]:
    """The checkpoint's absolute path and the experiment of the pretrained cells: the study's plans under their twin
    name (written now), after checking that the checkpoint fits their network; ValueError naming the file when it
    does not (before anything trains)."""
    from nnunet_ext.pretrained import check_fits, write_twin_plans

    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"--pretrained {checkpoint}: no such file")
    checkpoint, e = os.path.abspath(checkpoint), study.experiment
    with open(e.plans_file()) as f:
        plans = json.load(f)
    with open(os.path.join(study.raw, "dataset.json")) as f:
        channels = len(json.load(f)["channel_names"])
    transfer = check_fits(checkpoint, plans, e.configuration, channels)
    log(f"--pretrained {checkpoint} ({transfer.kind}): {len(transfer.values)} tensors fit the {e.configuration} "
        f"network of {e.plans}", "study")
    twin = write_twin_plans(e.plans_file(), checkpoint)
    return checkpoint, replace(e, plans=twin, log_folder=os.path.join(e.log_folder, "pretrained"))


def run(args: argparse.Namespace) -> int:
    """Run ``nnunet-ext study``: validate the grid, then train/predict/evaluate, print or submit it."""
    try:
        resolve_options(args)
        cells = build_grid(args.trainers, args.labels, args.unlabeled, args.epochs, args.iters,
                           not args.no_mirroring, args.repeats)
        if args.pretrained:
            cells = with_pretrained_twins(cells)
        slurm = slurm_parameters(args.slurm)
        if args.dispatch == "submitit":
            load_submitit()
        # with --dispatch print, stdout carries only the commands
        with contextlib.redirect_stdout(sys.stderr) if args.dispatch == "print" else contextlib.nullcontext():
            study = make_study(args)
        check_budgets(cells, study)  # before anything trains
        check_same_norm(cells, study.experiment)
    except (ImportError, RuntimeError) as error:  # submitit missing; cpu-smoke data preparation failed (its log)
        raise SystemExit(f"nnunet-ext study: {error}") from error
    if args.dispatch == "print":
        return print_commands(study, cells)
    log(f"{len(cells)} cells ({args.repeats} repeat{'s' if args.repeats > 1 else ''} each) x folds "
        f"{' '.join(map(str, study.folds))} on {study.experiment.dataset_name} "
        f"({study.experiment.plans}, {study.experiment.configuration}); output {study.output}", "study")
    with locks.held(os.path.join(study.output, locks.LOCK_FILE), f"study folder {study.output}"):
        if args.dispatch == "submitit":
            return submit_cells(study, cells, slurm, args.resubmit)
        return run_local(study, cells, args.baseline)
