"""Pseudo-label student: nnU-Net's own training on the fold's labeled cases plus cases a teacher labeled.

The nnU-Net maintainers' recipe for unlabeled scans (train, predict the unlabeled images, retrain on both),
made reproducible per fold by ``nnunet-ext self-train`` (:mod:`nnunet_ext.selftrain`), which trains the
teacher, predicts this trainer's unlabeled pool with the fold's teacher and writes the kept cases and their
record (:mod:`nnunet_ext.data.pseudo_labels`). This trainer then trains the planned network, loss, loader and
augmentation unchanged, on the label budget's cases plus the kept pseudo-labeled ones (foreground
oversampling included: the pseudo labels carry class locations). Validation and the final validation are
nnU-Net's, on the fold's real validation cases only.

The pool is the ss trainers' (``_<M>unlabeled``, leakage guard, ``unlabeled_cases.json``); the kept cases,
their teacher and its checkpoint's sha256 are written to the fold's ``pseudo_labeled_cases.json``.
"""

from __future__ import annotations

import os

from batchgenerators.utilities.file_and_folder_operations import save_json
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

from nnunet_ext.data.pool import UnlabeledPool
from nnunet_ext.data.pseudo_labels import (
    PSEUDO_IDS_FILE,
    RECORD,
    cases_folder,
    check_record,
    pseudo_label_folder,
    read_json,
)
from nnunet_ext.data.unlabeled import CaseUnion
from nnunet_ext.files import file_sha256
from nnunet_ext.trainers.base import ExtTrainer
from nnunet_ext.trainers.names import TrainerSpec
from nnunet_ext.trainers.semisupervised import UnlabeledPoolMixin


class PseudoLabelTrainer(UnlabeledPoolMixin, ExtTrainer):
    """Student of pseudo-label self-training (run it through ``nnunet-ext self-train``)."""

    trainer_spec = TrainerSpec(base="PseudoLabelTrainer")

    def pseudo_label_folder(self) -> str:
        """Where ``nnunet-ext self-train`` writes this fold's pseudo-labeled cases."""
        return pseudo_label_folder(self.preprocessed_dataset_folder_base, type(self).__name__,
                                   self.plans_manager.plans_name, self.configuration_name, self.fold)

    def unlabeled_pool(self) -> tuple[UnlabeledPool, list[str]]:
        """(pool, selected ids) of this fold: the images the teacher labels (``nnunet-ext self-train`` asks)."""
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        pool, selected, _, _ = self.select_unlabeled(*super().get_tr_and_val_datasets())
        return pool, selected

    def get_tr_and_val_datasets(self):
        """nnU-Net's datasets with the kept pseudo-labeled cases added to training (validation unchanged)."""
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        _, selected, _, _ = self.select_unlabeled(dataset_tr, dataset_val)
        folder = self.pseudo_label_folder()
        record = read_json(os.path.join(folder, RECORD))
        if record is None:
            raise ValueError(
                f"{type(self).__name__}, fold {self.fold}: no pseudo labels in {folder}. Run 'nnunet-ext self-train "
                f"-d {self.plans_manager.dataset_name} -tr {type(self).__name__} -f {self.fold} "
                f"-p {self.plans_manager.plans_name} -c {self.configuration_name}': it trains the teacher, predicts "
                f"this fold's unlabeled pool and then trains this student.")
        kept = check_record(record, folder, selected, dataset_tr.identifiers, dataset_val.identifiers,
                            self.test_ids())
        checkpoint = record["teacher_checkpoint"]
        if os.path.isfile(checkpoint) and file_sha256(checkpoint) != record["teacher_checkpoint_sha256"]:
            raise ValueError(f"{folder}: the teacher checkpoint {checkpoint} changed since it made these pseudo "
                             f"labels; delete {folder} and rerun 'nnunet-ext self-train' for this fold.")
        cases = cases_folder(folder)
        pseudo = infer_dataset_class(cases)(cases, list(kept))  # a copy: nnU-Net sorts the list in place
        self.print_to_log_file(f"Pseudo labels: training on {len(dataset_tr.identifiers)} labeled + {len(kept)} "
                               f"pseudo-labeled cases (of {len(selected)} predicted by {record['teacher']}): {kept}")
        if self.local_rank == 0:
            save_json({"trainer": type(self).__name__, "fold": self.fold, "pseudo_labeled": kept,
                       "teacher": record["teacher"], "teacher_checkpoint": checkpoint,
                       "teacher_checkpoint_sha256": record["teacher_checkpoint_sha256"], "rule": record["rule"],
                       "keep_fraction": record["keep_fraction"], "record": os.path.join(folder, RECORD)},
                      os.path.join(self.output_folder, PSEUDO_IDS_FILE), sort_keys=False)
        return CaseUnion([dataset_tr, pseudo]), dataset_val
