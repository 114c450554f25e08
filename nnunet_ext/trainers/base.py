"""Base trainer: applies what a trainer's name asks for (label budget, schedule, mirroring, seed)."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import save_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext import checkpoints, locks
from nnunet_ext.compat import (
    accept_pretrained_weights,
    captured_checkpoint_load,
    captured_checkpoint_save,
    seeded_augmenters,
)
from nnunet_ext.data.budgets import (
    DEFAULT_SEED,
    LABELED_IDS_FILE,
    load_order_file,
    order_file_path,
    split_budget,
)
from nnunet_ext.trainers.names import TrainerSpec

# DDP rank r seeds its data with rank 0's seed + r * RANK_SEED_STRIDE (ExtTrainer.data_seed). Rank 0's seeds stay
# below it (repeat S < 1000: process seed S, worker seeds S * 1000 + stream * 100 + i, i < 100): no two ranks share one
RANK_SEED_STRIDE = 1_000_000


def honour_omp_num_threads(device: torch.device) -> int | None:
    """On CPU, use ``OMP_NUM_THREADS`` torch threads when it is set to a positive integer; return it (else None).

    ``nnUNetv2_train -device cpu`` calls ``torch.set_num_threads(multiprocessing.cpu_count())`` before it builds
    the trainer, which overrides the variable: two trainings side by side on a shared machine (or two test
    workers) then run twice as many threads as there are cores, and each slows down many times over. nnU-Net
    sets one thread on GPU; that is left alone.
    """
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if device.type != "cpu" or not threads.isdigit() or int(threads) < 1:
        return None
    torch.set_num_threads(int(threads))
    return int(threads)


class ExtTrainer(nnUNetTrainer):
    """nnUNetTrainer plus the name grammar; subclasses set ``trainer_spec`` (generated names do)."""

    trainer_spec = TrainerSpec(base="ExtTrainer")

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        honour_omp_num_threads(self.device)
        self._split: tuple[list[str], list] | None = None  # see do_split
        self.beyond_budget: list[str] = []
        spec = self.trainer_spec
        if spec.seed is not None:  # before the network is built: same weights, same batches, same augmentation
            self.seed_main_process(spec.seed)
        if spec.epochs is not None:
            self.num_epochs = spec.epochs
        if spec.iters is not None:
            self.num_iterations_per_epoch = spec.iters
            self.num_val_iterations_per_epoch = max(1, spec.iters // 5)

    def initialize(self):
        """nnU-Net's initialize; ``-pretrained_weights`` then loads whatever matches (``nnunet_ext.pretrained``)."""
        super().initialize()
        accept_pretrained_weights(self.network, self.print_to_log_file, record_folder=self.output_folder)

    # -- one run per fold -------------------------------------------------------------------------------
    def fold_lock(self) -> contextlib.AbstractContextManager:
        """The lock file in the fold's result folder, held while this process trains or validates it
        (:mod:`nnunet_ext.locks`): a second ``nnUNetv2_train`` of the same fold is refused with the holder named,
        instead of both writing one folder's checkpoints; a killed run's lock is taken over; a study or demo that
        locked the fold before starting this process lends it its lock. DDP: rank 0 holds it for all ranks."""
        if self.local_rank != 0:
            return contextlib.nullcontext()
        return locks.held_unless_by_parent(os.path.join(self.output_folder, locks.LOCK_FILE),
                                           f"training fold {self.fold} of {self.__class__.__name__} "
                                           f"({self.output_folder})")

    def run_training(self):
        """nnU-Net's training loop under :meth:`fold_lock`."""
        with self.fold_lock():
            super().run_training()

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation under :meth:`fold_lock` (it writes the fold's validation folder)."""
        with self.fold_lock():
            super().perform_actual_validation(save_probabilities)

    # -- checkpoints --------------------------------------------------------------------------------
    def checkpoint_extras(self) -> dict:
        """Entries a subclass adds to nnU-Net's checkpoint (e.g. a branch or a teacher); none here."""
        return {}

    def restore_checkpoint_extras(self, checkpoint: dict, source: str) -> None:
        """Restore what :meth:`checkpoint_extras` added, from the checkpoint read from ``source``; nothing here."""

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus :meth:`checkpoint_extras`, written once: to a temporary file, then moved into
        place, so ``filename`` never exists without its extras (a run killed mid-save keeps the previous
        checkpoint, and ``--c`` can always resume them)."""
        extras = self.checkpoint_extras() if self.local_rank == 0 and not self.disable_checkpointing else {}
        if not extras:
            super().save_checkpoint(filename)
            return
        with captured_checkpoint_save() as saved:
            super().save_checkpoint(filename)
        checkpoint = {**saved[0], **extras}
        partial = f"{filename}.partial"
        torch.save(checkpoint, partial)
        os.replace(partial, filename)

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """nnU-Net's checkpoint loading, then :meth:`restore_checkpoint_extras` from the same dictionary; a
        checkpoint written by another trainer (a renamed or copied result folder) is refused before anything is
        loaded (:mod:`nnunet_ext.checkpoints`)."""
        path = filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else \
            os.path.join(self.output_folder, "(checkpoint)")

        def check(checkpoint: dict) -> None:
            checkpoints.check_written_by(checkpoint.get("trainer_name"), path, self.__class__.__name__)

        with captured_checkpoint_load(filename_or_checkpoint, check) as loaded:
            super().load_checkpoint(filename_or_checkpoint)
        self.restore_checkpoint_extras(loaded[0], str(filename_or_checkpoint))

    def on_train_epoch_end(self, train_outputs: list[dict]):
        """nnU-Net's epoch end, plus the mean of every other loss part a train step returns (seg_loss,
        branch_loss, ...) in the log."""
        super().on_train_epoch_end(train_outputs)
        for key in dict.fromkeys(k for o in train_outputs for k in o if k != "loss"):
            values = [o[key] for o in train_outputs if key in o]
            self.print_to_log_file(f"{key} {np.round(float(np.mean(values)), decimals=4)}")

    def data_seed(self, seed: int) -> int:
        """``seed`` for this process's DDP rank: unchanged on rank 0 (and without DDP), ``seed + rank *
        RANK_SEED_STRIDE`` on rank r, so every GPU draws its own crops and augmentation, as stock nnU-Net's
        (unseeded) ranks do, instead of N copies of one batch."""
        return seed + self.local_rank * RANK_SEED_STRIDE

    def seed_main_process(self, seed: int) -> None:
        """Seed Python, NumPy and torch with this rank's :meth:`data_seed` of ``seed``.

        The single-threaded augmenter (``nnUNet_n_proc_DA=0``) crops with NumPy and augments with NumPy and torch
        in this process, so torch is seeded per rank too. The initial weights need no common torch seed: rank r's
        differ from rank 0's only until nnU-Net wraps the network in DDP, which broadcasts rank 0's (the mean
        teacher copies the student after that), so rank 0's seed alone fixes the model.
        """
        seed = self.data_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    @property
    def budget_seed(self) -> int:
        """Seed of the labeled (and unlabeled) ordering: the default for no seed or ``_s0``, another per ``_s<S>``."""
        return DEFAULT_SEED + (self.trainer_spec.seed or 0)

    def augmenter_seeds(self, stream: int, processes: int) -> list[int] | None:
        """Seeds of the augmentation workers of one data stream (0 training, 1 validation, 2 unlabeled) for
        ``_s<S>`` trainers, ``S * 1000 + stream * 100 + i`` on rank 0 and per rank (:meth:`data_seed`); None
        (nnU-Net's unseeded workers) otherwise."""
        seed = self.trainer_spec.seed
        return None if seed is None else [self.data_seed(seed * 1000 + stream * 100 + i) for i in range(processes)]

    def get_dataloaders(self):
        """nnU-Net's loaders; for ``_s<S>`` trainers their augmentation workers are seeded (stream 0 and 1), and
        without workers each stream draws from its own seeded random state (``compat.seeded_augmenters``)."""
        seeded = self.trainer_spec.seed is not None
        with seeded_augmenters(self.augmenter_seeds) if seeded else contextlib.nullcontext():
            return super().get_dataloaders()

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """nnU-Net's augmentation setup; without mirroring (training and inference) for ``_noMirroring``."""
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.trainer_spec.mirroring:
            mirror_axes = None
            self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    def do_split(self):
        """nnU-Net's split, with the training cases cut to the label budget; computed, logged and written to disk
        once per trainer (nnU-Net asks again for the final validation), the same split every time.

        ``self.beyond_budget`` keeps the fold's other training cases, in order (semi-supervised
        trainers use their images as unlabeled data).
        """
        if self._split is None:
            self._split = self._budget_split(*super().do_split())
        labeled, val_keys = self._split
        return list(labeled), list(val_keys)  # copies: nnU-Net's datasets sort the lists they get in place

    def _budget_split(self, tr_keys, val_keys) -> tuple[list[str], list]:
        """Cut nnU-Net's training cases to the label budget; log the labeled ids and write them to disk."""
        tr_keys = [str(k) for k in tr_keys]
        budget = self.trainer_spec.labels
        if budget is None:
            return tr_keys, val_keys
        order_file = order_file_path(self.preprocessed_dataset_folder_base)
        # a pinned order fixes repeat 0; other repeats (_s1, _s2, ...) draw their own seeded orderings
        pinned = os.path.isfile(order_file) and not self.trainer_spec.seed
        order = load_order_file(order_file) if pinned else None
        try:
            labeled, self.beyond_budget = split_budget(tr_keys, budget, order, self.budget_seed)
        except ValueError as e:
            raise ValueError(f"{self.__class__.__name__}, fold {self.fold}: {e}") from None
        source = f"pinned order {order_file}" if order else f"seeded order, seed {self.budget_seed}" + (
            f" (repeat {self.trainer_spec.seed}; {order_file} pins repeat 0 only)" if os.path.isfile(order_file)
            else "")
        self.print_to_log_file(f"Label budget {budget}: training on {labeled} ({source})")
        if self.local_rank == 0:
            save_json({"trainer": self.__class__.__name__, "fold": self.fold, "label_budget": budget,
                       "labeled": labeled, "fold_training_cases": len(tr_keys), "order_source": source,
                       "seed": self.trainer_spec.seed},
                      os.path.join(self.output_folder, LABELED_IDS_FILE), sort_keys=False)
        return labeled, val_keys
