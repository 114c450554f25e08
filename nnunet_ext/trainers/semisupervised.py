"""Semi-supervised update (paper §3): labeled samples give segmentation + branch loss, unlabeled ones
the branch loss only. Mixed into a label-free branch trainer (VAE, CPC) to make its ss* variant."""

from __future__ import annotations

import contextlib
import os
from typing import ClassVar

import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
import torch
from batchgenerators.utilities.file_and_folder_operations import save_json
from nnunetv2.paths import nnUNet_raw
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_ext.data.budgets import UNLABELED_IDS_FILE
from nnunet_ext.data.pool import build_pool, complete_cases, load_manifest, raw_test_ids, unlabeled_folder
from nnunet_ext.data.unlabeled import PooledDataset, SemiSupervisedDataLoader
from nnunet_ext.trainers.multitask import BranchBatch


def _route_pooled_dataset(data, *args, **kwargs):
    """Stand-in for nnUNetDataLoader: our loader for the pooled training set, nnU-Net's otherwise."""
    loader = SemiSupervisedDataLoader if isinstance(data, PooledDataset) else nnUNetDataLoader
    return loader(data, *args, **kwargs)


class SemiSupervisedMixin:
    """Adds the unlabeled pool and the mixed loader to a branch trainer whose branch needs no labels.

    ``unlabeled_fraction``: share of every batch drawn from the unlabeled pool (default half and half
    of nnU-Net's batch size; at least one labeled and one unlabeled sample per batch).
    """

    unlabeled_fraction: ClassVar[float] = 0.5

    def get_tr_and_val_datasets(self):
        """Labeled training set (the budget) + the fold's unlabeled pool, and nnU-Net's validation set."""
        if self.branch_class.needs_target:
            raise TypeError(f"{type(self).__name__}: {self.branch_class.__name__} needs labels and cannot "
                            f"learn from unlabeled images.")
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        folder = unlabeled_folder(self.preprocessed_dataset_folder_base, self.configuration_manager.data_identifier)
        folder_ids = complete_cases(self.dataset_class, folder) if os.path.isdir(folder) else []
        raw = os.path.join(nnUNet_raw.get(), self.plans_manager.dataset_name) if nnUNet_raw.is_set() else None
        pool = build_pool(self.beyond_budget, folder_ids, dataset_tr.identifiers, dataset_val.identifiers,
                          raw_test_ids(raw, self.dataset_json["file_ending"]), load_manifest(folder),
                          self.budget_seed)
        try:
            selected = pool.select(self.trainer_spec.unlabeled)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}, fold {self.fold}: {e}") from None
        if not selected:
            raise ValueError(f"{type(self).__name__}, fold {self.fold}: no unlabeled images. Use a label budget "
                             f"(_<N>labels) below the fold's training cases, or preprocess imagesUnlabeled with "
                             f"'nnunet-ext preprocess-unlabeled -d {self.plans_manager.dataset_name} "
                             f"-c {self.configuration_name} -p {self.plans_manager.plans_name}'.")
        self.print_to_log_file(f"Unlabeled pool: {len(pool.ids)} images ({pool.summary()}); using "
                               f"{len(selected)}; excluded {len(pool.excluded)}: {pool.excluded}")
        if self.local_rank == 0:
            save_json({"trainer": type(self).__name__, "fold": self.fold, "pool_size": len(pool.ids),
                       "unlabeled": selected, "source": {i: pool.source[i] for i in selected},
                       "excluded": pool.excluded, "unlabeled_fraction": self.unlabeled_fraction},
                      os.path.join(self.output_folder, UNLABELED_IDS_FILE), sort_keys=False)
        from_training = [i for i in selected if pool.source[i] != "imagesUnlabeled"]
        from_folder = [i for i in selected if pool.source[i] == "imagesUnlabeled"]
        parts = [self.dataset_class(d, ids) for d, ids in
                 ((self.preprocessed_dataset_folder, from_training), (folder, from_folder)) if ids]
        return PooledDataset(dataset_tr, parts, self.unlabeled_fraction), dataset_val

    def get_dataloaders(self):
        """nnU-Net's loaders and workers; the pooled training set gets the semi-supervised loader."""
        # nnU-Net constructs nnUNetDataLoader inline; route the pooled set to ours while it does
        with _patched(nnunet_trainer_module, "nnUNetDataLoader", _route_pooled_dataset):
            return super().get_dataloaders()

    def branch_batch(self, batch: dict) -> BranchBatch:
        """Unlabeled samples are marked so that they contribute the branch loss only."""
        return BranchBatch(None, batch["labeled"].to(self.device, dtype=torch.bool))


@contextlib.contextmanager
def _patched(module, name: str, value):
    """Temporarily replace ``module.name``."""
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)
