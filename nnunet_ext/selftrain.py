"""Pseudo-label self-training, the nnU-Net maintainers' recipe for unlabeled scans, automated fold by fold.

For each fold of a ``PseudoLabelTrainer[_<N>labels][_<M>unlabeled]...`` student:

1. the teacher (default: ``EncDecTrainer`` with the student's budget, schedule, mirroring and seed; any of our
   trainers with the same budget and seed via ``--teacher``) is trained with ``nnUNetv2_train`` (skipped when
   trained). A teacher with another budget or seed would have seen labels of cases the student treats as
   unlabeled, so it is refused;
2. the student's unlabeled pool of the fold (fold training cases beyond the budget and preprocessed
   ``imagesUnlabeled``; never a validation or test case nor a copy of one: :mod:`nnunet_ext.data.pool`) is
   predicted from its raw images with ``nnUNetv2_predict -f <fold> --save_probabilities``: the fold's teacher
   only, which never saw the fold's validation cases;
3. the teacher's confidence ranks the cases and the top ``--keep`` fraction is kept (the rule in
   :mod:`nnunet_ext.data.pseudo_labels`);
4. kept cases are preprocessed with the dataset's plans as labeled cases (image + pseudo label, nnU-Net's
   ``DefaultPreprocessor.run_case_save``), and ``pseudo_labels.json`` records the teacher, its checkpoint's
   sha256, the pool, every score and what was kept, written last;
5. the student is trained with ``nnUNetv2_train`` on the labeled cases plus the kept ones.

Rerunning skips finished steps; pseudo labels made by another teacher, checkpoint, pool or ``--keep`` are
never reused or overwritten (the command says which folder to delete).
"""

from __future__ import annotations

import argparse
import os
import time

from nnunet_ext.data.pseudo_labels import (
    RECORD,
    REQUEST,
    RULE,
    case_score,
    cases_folder,
    keep_most_confident,
    pseudo_label_folder,
    read_json,
)
from nnunet_ext.files import file_sha256
from nnunet_ext.pipeline import Experiment, log, nnunet_environment, run_command
from nnunet_ext.trainers.names import TrainerNameError, TrainerSpec, parse_trainer_name

STUDENT_BASE = "PseudoLabelTrainer"
DEFAULT_TEACHER_BASE = "EncDecTrainer"
DEFAULT_KEEP = 0.5


def default_teacher(student: str) -> str:
    """``EncDecTrainer`` with the student's label budget, epochs, iterations, mirroring and seed."""
    spec = parse_trainer_name(student)
    return TrainerSpec(DEFAULT_TEACHER_BASE, spec.labels, None, spec.epochs, spec.iters, spec.mirroring,
                       spec.seed).name


def check_pair(student: str, teacher: str) -> None:
    """Raise ValueError unless ``student`` is a pseudo-label student and ``teacher`` one of our other trainers with
    the student's label budget and seed (so the teacher saw exactly the student's labeled cases)."""
    try:
        spec = parse_trainer_name(student)
        teacher_spec = parse_trainer_name(teacher)
    except TrainerNameError as error:
        raise ValueError(str(error)) from None
    if spec.base != STUDENT_BASE:
        raise ValueError(f"-tr {student}: self-train trains a {STUDENT_BASE}[_<N>labels]... student")
    if teacher_spec.base == STUDENT_BASE:
        raise ValueError(f"--teacher {teacher}: the teacher must be another trainer (e.g. {default_teacher(student)})")
    if (teacher_spec.labels, teacher_spec.seed) != (spec.labels, spec.seed):
        raise ValueError(f"--teacher {teacher}: its label budget and seed ({teacher_spec.labels}, "
                         f"{teacher_spec.seed}) differ from the student's ({spec.labels}, {spec.seed}); it would have "
                         f"seen labels of cases the student treats as unlabeled (e.g. {default_teacher(student)})")


class SelfTraining:
    """The teacher, pseudo labels and student of one student trainer on one dataset, plans and configuration."""

    def __init__(self, experiment: Experiment, student: str, teacher: str | None = None, keep: float = DEFAULT_KEEP,
                 num_gpus: int | None = None):
        self.experiment = experiment
        self.student = student
        self.teacher = teacher or default_teacher(student)
        check_pair(self.student, self.teacher)
        if not 0 < keep <= 1:
            raise ValueError(f"--keep must be a fraction in (0, 1], got {keep}")
        self.keep = keep
        self.num_gpus = num_gpus

    def folder(self, fold: int | None) -> str:
        """The fold's pseudo-label folder (fold None: the student's, which holds the logs)."""
        e = self.experiment
        return pseudo_label_folder(os.path.join(e.env["nnUNet_preprocessed"], e.dataset_name), self.student, e.plans,
                                   e.configuration, fold)

    def train(self, trainer: str, fold: int) -> None:
        """``nnUNetv2_train`` of one fold (skipped when trained, resumed with ``--c``)."""
        if self.experiment.is_trained(trainer, fold):
            log(f"{trainer} fold {fold}: already trained, skipping", "self-train")
            return
        gpus = [] if self.num_gpus is None else ["-num_gpus", str(self.num_gpus)]
        run_command(self.experiment.train_command(trainer, fold) + gpus, self.experiment.env,
                    self.experiment.train_log(trainer, fold))

    def run_fold(self, fold: int) -> None:
        """Teacher, pseudo labels, student of one fold (finished steps are skipped)."""
        self.train(self.teacher, fold)
        self.make_pseudo_labels(fold)
        self.train(self.student, fold)

    def make_pseudo_labels(self, fold: int) -> None:
        """Predict the fold's pool with the fold's teacher, keep the confident cases, preprocess them, record."""
        folder = self.folder(fold)
        checkpoint = os.path.join(self.experiment.result_folder(self.teacher), f"fold_{fold}", "checkpoint_final.pth")
        pool, selected, dataset = self.student_pool(fold)
        request = {"student": self.student, "fold": fold, "teacher": self.teacher, "teacher_checkpoint": checkpoint,
                   "teacher_checkpoint_sha256": file_sha256(checkpoint), "plans": self.experiment.plans,
                   "configuration": self.experiment.configuration, "pool": selected,
                   "pool_source": {i: pool.source[i] for i in selected}, "rule": RULE, "keep_fraction": self.keep}
        previous = read_json(os.path.join(folder, REQUEST))
        if previous is not None and previous != request:
            changed = sorted(k for k in request if previous.get(k) != request[k])
            raise ValueError(f"{folder} holds pseudo labels (or a started run) of another {', '.join(changed)}; "
                             f"delete the folder to make them again with this one")
        if read_json(os.path.join(folder, RECORD)) is not None:
            log(f"{self.student} fold {fold}: pseudo labels already made ({os.path.join(folder, RECORD)})",
                "self-train")
            return
        from nnunet_ext.data.preprocess_unlabeled import write_json_atomic

        os.makedirs(folder, exist_ok=True)
        write_json_atomic(os.path.join(folder, REQUEST), request)
        log(f"{self.student} fold {fold}: {self.teacher} predicts {len(selected)} unlabeled images "
            f"({pool.summary()} in the pool)", "self-train")
        images = self.link_inputs(folder, selected, pool.source, dataset)
        predictions = os.path.join(folder, "predictions")
        run_command(self.experiment.predict_command(self.teacher, [fold], images, predictions, "--save_probabilities"),
                    self.experiment.env, os.path.join(folder, "predict.log"), echo=False)
        import numpy as np

        regions = dataset["regions"]
        scores = {}
        for case in selected:
            with np.load(os.path.join(predictions, case + ".npz")) as npz:
                scores[case] = case_score(npz["probabilities"], regions)
        kept = keep_most_confident(scores, self.keep)
        log(f"{self.student} fold {fold}: keeping {len(kept)} of {len(selected)} pseudo-labeled cases (confidence "
            f"{min(scores[c] for c in kept):.3f}..{max(scores.values()):.3f})", "self-train")
        self.preprocess(folder, kept, images, predictions, dataset)
        write_json_atomic(os.path.join(folder, RECORD), {
            **request, "scores": scores, "kept": kept, "dropped": [c for c in selected if c not in kept],
            "created": time.strftime("%Y-%m-%d %H:%M:%S")})

    def student_pool(self, fold: int):
        """(pool, selected ids, dataset facts) of the student's fold, computed by the student trainer itself (built as
        ``nnUNetv2_train`` builds it)."""
        import torch
        from nnunetv2.run.run_training import get_trainer_from_args

        trainer = get_trainer_from_args(self.experiment.dataset_name, self.experiment.configuration, fold,
                                        self.student, self.experiment.plans, device=torch.device("cpu"))
        pool, selected = trainer.unlabeled_pool()
        return pool, selected, {"json": trainer.dataset_json, "plans_manager": trainer.plans_manager,
                                "regions": trainer.label_manager.has_regions}

    def link_inputs(self, folder: str, cases: list[str], source: dict[str, str], dataset: dict) -> str:
        """A folder of links to the raw images of ``cases`` (imagesTr or imagesUnlabeled), nnU-Net-named."""
        from nnunet_ext.data.pool import UNLABELED_RAW
        from nnunet_ext.data.raw_cases import raw_cases

        raw = os.path.join(self.experiment.env["nnUNet_raw"], self.experiment.dataset_name)
        ending, channels = dataset["json"]["file_ending"], len(dataset["json"]["channel_names"])
        found = {sub: raw_cases(os.path.join(raw, sub), ending, channels) for sub in ("imagesTr", UNLABELED_RAW)
                 if os.path.isdir(os.path.join(raw, sub))}
        images = os.path.join(folder, "input")
        os.makedirs(images, exist_ok=True)
        for case in cases:
            sub = UNLABELED_RAW if source[case] == UNLABELED_RAW else "imagesTr"
            if case not in found.get(sub, {}):
                raise FileNotFoundError(f"{os.path.join(raw, sub)}: no raw images of unlabeled pool case '{case}'")
            for file in found[sub][case]:
                link = os.path.join(images, os.path.basename(file))
                if os.path.lexists(link):
                    os.remove(link)
                os.symlink(os.path.abspath(file), link)
        return images

    def preprocess(self, folder: str, kept: list[str], images: str, predictions: str, dataset: dict) -> None:
        """Preprocess each kept case as nnU-Net preprocesses a labeled case: its images and its pseudo label."""
        from nnunet_ext.data.raw_cases import raw_cases

        plans_manager = dataset["plans_manager"]
        configuration = plans_manager.get_configuration(self.experiment.configuration)
        preprocessor = configuration.preprocessor_class(verbose=False)
        ending = dataset["json"]["file_ending"]
        files = raw_cases(images, ending, len(dataset["json"]["channel_names"]))
        out = cases_folder(folder)
        os.makedirs(out, exist_ok=True)
        for index, case in enumerate(kept, 1):
            preprocessor.run_case_save(os.path.join(out, case), files[case], os.path.join(predictions, case + ending),
                                       plans_manager, configuration, dataset["json"])
            log(f"preprocessed pseudo-labeled case {index}/{len(kept)} {case}", "self-train")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments follow nnUNetv2_train (folds as -f, like nnUNetv2_predict)."""
    parser.add_argument("-d", required=True, help="dataset id or name")
    parser.add_argument("-tr", required=True, help=f"student trainer, e.g. {STUDENT_BASE}_6labels")
    parser.add_argument("-f", type=int, nargs="+", required=True, help="folds")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default %(default)s)")
    parser.add_argument("-c", "--configuration", default="3d_fullres", help="configuration (default %(default)s)")
    parser.add_argument("--teacher", default=None,
                        help="teacher trainer with the student's budget and seed (default: EncDecTrainer with the "
                             "student's suffixes, e.g. EncDecTrainer_6labels for PseudoLabelTrainer_6labels)")
    parser.add_argument("--keep", type=float, default=DEFAULT_KEEP,
                        help="fraction of the pool kept, most confident first (default %(default)s)")
    parser.add_argument("-device", choices=("cuda", "cpu", "mps"), default="cuda", help="device (default cuda)")
    parser.add_argument("-num_gpus", type=int, default=None, help="GPUs per training (nnUNetv2_train -num_gpus)")


def run(args: argparse.Namespace) -> int:
    """Self-train every fold given."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    env = nnunet_environment()
    name = maybe_convert_to_dataset_name(args.d)
    plans_file = os.path.join(env["nnUNet_preprocessed"], name, f"{args.plans}.json")
    if not os.path.isfile(plans_file):
        raise FileNotFoundError(f"-p {args.plans}: {plans_file} does not exist; plan and preprocess the dataset first")
    dataset_id = int(name[len("Dataset"):len("Dataset") + 3])
    experiment = Experiment(dataset_id, name, env, "", args.plans, args.configuration, args.device)
    training = SelfTraining(experiment, args.tr, args.teacher, args.keep, args.num_gpus)
    experiment.log_folder = os.path.join(training.folder(None), "logs")
    for fold in args.f:
        log(f"fold {fold}: teacher {training.teacher} -> pseudo labels -> student {training.student}", "self-train")
        training.run_fold(fold)
    return 0
