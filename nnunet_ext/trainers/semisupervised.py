"""Semi-supervised update (paper §3): labeled images give segmentation + branch loss, unlabeled images the
branch loss only. Mixed into a label-free branch trainer (VAE, CPC) to make its ss* variant.

Every optimizer step sees exactly the labeled batch its supervised twin sees — nnU-Net's own, unmodified
loader, batch size, foreground oversampling and augmentation — plus one batch of unlabeled images drawn
with the same patch size, workers and augmentation (:mod:`nnunet_ext.data.unlabeled`). The two passes are
accumulated into one step: the unlabeled pass (encoder + branch) runs forward and backward right after
nnU-Net clears the gradients, its graph is freed, then nnU-Net's own train_step runs the labeled pass,
clips the summed gradient once and steps once. Peak memory is that of the larger pass, never of a
double batch.
"""

from __future__ import annotations

import os
from typing import ClassVar

import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import save_json
from nnunetv2.paths import nnUNet_raw
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnunet_ext.compat import after_zero_grad, captured_augmentation
from nnunet_ext.data.budgets import UNLABELED_IDS_FILE
from nnunet_ext.data.pool import (
    UnlabeledPool,
    build_pool,
    complete_cases,
    load_manifest,
    raw_test_ids,
    unlabeled_folder,
    unpreprocessed_unlabeled,
)
from nnunet_ext.data.random_streams import in_process_stream
from nnunet_ext.data.unlabeled import UnlabeledDataLoader, UnlabeledDataset, folder_dataset_class


class UnlabeledPoolMixin:
    """The fold's leakage-guarded unlabeled pool (:mod:`nnunet_ext.data.pool`) and the nested ``_<M>unlabeled``
    selection from it, logged and written to the fold's ``unlabeled_cases.json``: one place for every trainer that
    learns from unlabeled images (ss trainers, mean teacher, pseudo-label students)."""

    def select_unlabeled(self, dataset_tr, dataset_val) -> tuple[UnlabeledPool, list[str], str, type | None]:
        """(pool, selected ids, preprocessed imagesUnlabeled folder, its dataset class or None) of this fold."""
        folder = unlabeled_folder(self.preprocessed_dataset_folder_base, self.configuration_manager.data_identifier)
        folder_class = folder_dataset_class(folder)  # its own format, as nnU-Net reads each preprocessed folder
        folder_ids = complete_cases(folder_class, folder) if folder_class else []
        test_ids = self.test_ids()  # first: it names nnUNet_raw when that is unset
        missing = unpreprocessed_unlabeled(os.path.join(nnUNet_raw.get(), self.plans_manager.dataset_name),
                                           self.dataset_json["file_ending"], folder_ids)
        if missing:
            raise ValueError(f"{type(self).__name__}, fold {self.fold}: {len(missing)} images of imagesUnlabeled "
                             f"have no preprocessed copy for plans {self.plans_manager.plans_name}, configuration "
                             f"{self.configuration_name} (e.g. {missing[:3]}), so training would leave them out "
                             f"without a word; run 'nnunet-ext preprocess-unlabeled -d "
                             f"{self.plans_manager.dataset_name} -c {self.configuration_name} "
                             f"-p {self.plans_manager.plans_name}' (it skips cases already done).")
        pool = build_pool(self.beyond_budget, folder_ids, dataset_tr.identifiers, dataset_val.identifiers,
                          test_ids, load_manifest(folder), self.budget_seed)
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
                       "excluded": pool.excluded, **self.unlabeled_record()},
                      os.path.join(self.output_folder, UNLABELED_IDS_FILE), sort_keys=False)
        return pool, selected, folder, folder_class

    def test_ids(self) -> set[str]:
        """Case ids of the dataset's labeled test split (raw imagesTs/labelsTs; never trained on); raise when the
        raw dataset cannot be read, rather than train on unlabeled or pseudo-labeled images without the guard."""
        if not nnUNet_raw.is_set():
            raise RuntimeError(f"{type(self).__name__}: nnUNet_raw is not set, so the test split (imagesTs, labelsTs) "
                               f"of {self.plans_manager.dataset_name} cannot be read and kept out of the unlabeled and "
                               f"pseudo-labeled images; set nnUNet_raw to the folder that holds "
                               f"{self.plans_manager.dataset_name} (export nnUNet_raw=/path/to/nnUNet_raw).")
        return raw_test_ids(os.path.join(nnUNet_raw.get(), self.plans_manager.dataset_name),
                            self.dataset_json["file_ending"])

    def unlabeled_record(self) -> dict:
        """Extra entries of ``unlabeled_cases.json``; none here."""
        return {}


class SemiSupervisedMixin(UnlabeledPoolMixin):
    """Adds the unlabeled pool, its loader and the accumulated unlabeled pass to a branch trainer whose branch
    needs no labels.

    ``unlabeled_batch_size``: unlabeled images per step (default None: nnU-Net's batch size, i.e. as many
    unlabeled as labeled crops; per GPU under DDP).
    """

    unlabeled_batch_size: ClassVar[int | None] = None

    def unlabeled_per_step(self) -> int:
        """Unlabeled images per optimizer step (per GPU under DDP)."""
        return self.unlabeled_batch_size or self.batch_size

    def unlabeled_record(self) -> dict:
        """``unlabeled_cases.json`` also says how many unlabeled images each step draws."""
        return {"unlabeled_per_step": self.unlabeled_per_step()}

    def get_tr_and_val_datasets(self):
        """nnU-Net's training (the label budget) and validation datasets, unchanged; also builds the fold's
        leakage-guarded unlabeled dataset (``self.unlabeled_dataset``) and writes its ids to disk."""
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if self.branch_class is not None and self.branch_class.needs_target:
            raise TypeError(f"{type(self).__name__}: {self.branch_class.__name__} needs labels and cannot "
                            f"learn from unlabeled images.")
        pool, selected, folder, folder_class = self.select_unlabeled(dataset_tr, dataset_val)
        from_training = [i for i in selected if pool.source[i] != "imagesUnlabeled"]
        from_folder = [i for i in selected if pool.source[i] == "imagesUnlabeled"]
        self.unlabeled_dataset = UnlabeledDataset([cls(d, ids) for cls, d, ids in (
            (self.dataset_class, self.preprocessed_dataset_folder, from_training),
            (folder_class, folder, from_folder)) if ids])
        return dataset_tr, dataset_val

    def get_dataloaders(self):
        """nnU-Net's own loaders, unchanged, plus ``self.dataloader_unlabeled`` with the same transforms, initial
        patch size and kind and number of augmentation workers, seeded as stream 2 (without workers: its own random
        state, :func:`~nnunet_ext.data.random_streams.in_process_stream`)."""
        with captured_augmentation(self) as augmentation:
            dataloader_train, dataloader_val = super().get_dataloaders()
        loader = UnlabeledDataLoader(self.unlabeled_dataset, self.unlabeled_per_step(), augmentation.initial_patch_size,
                                     self.configuration_manager.patch_size, self.label_manager,
                                     transforms=augmentation.transforms)
        processes = get_allowed_n_proc_DA()
        seeds = self.augmenter_seeds(2, max(1, processes))
        if processes == 0:  # in this process; seeded: from its own random state, so the labeled batches stay EncDec's
            self.dataloader_unlabeled = in_process_stream(loader, None, seeds)
        else:
            self.dataloader_unlabeled = NonDetMultiThreadedAugmenter(
                loader, None, processes, num_cached=max(6, processes // 2), seeds=seeds,
                pin_memory=self.device.type == "cuda", wait_time=0.002)
        return dataloader_train, dataloader_val

    def on_train_end(self):
        """nnU-Net's end of training, then the unlabeled workers are shut down."""
        super().on_train_end()
        if isinstance(getattr(self, "dataloader_unlabeled", None), NonDetMultiThreadedAugmenter):
            self.dataloader_unlabeled._finish()

    def unlabeled_backward(self, data: torch.Tensor) -> torch.Tensor:
        """Forward and backward of the branch loss on an unlabeled batch, with the branch weight's ramp at this step
        (scaled like nnU-Net's loss under AMP); the gradient accumulates into the parameters' ``.grad``, and the
        branch monitor reads it. Runs the unwrapped network, outside DDP's forward, so DDP leaves these gradients
        local until the labeled backward averages the sum."""
        data = data.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            loss = self.loss.factor * self.multitask_network.branch_loss(data)
        (self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss).backward()
        self.after_unlabeled_backward(loss.detach())
        return loss.detach()

    def train_step(self, batch: dict) -> dict:
        """One optimizer step over nnU-Net's labeled batch plus one unlabeled batch (see the module docstring)."""
        unlabeled = next(self.dataloader_unlabeled)
        losses = []
        with after_zero_grad(self.optimizer, lambda: losses.append(self.unlabeled_backward(unlabeled["data"]))):
            result = super().train_step(batch)
        result["unlabeled_branch_loss"] = losses[0].cpu().numpy()
        return result
