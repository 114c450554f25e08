"""The loader that mixes labeled and unlabeled patches (the pool itself is in :mod:`nnunet_ext.data.pool`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader


class PooledDataset:
    """nnU-Net dataset over labeled ids and unlabeled ids that may live in two preprocessed folders."""

    def __init__(self, labeled, unlabeled_parts: Sequence, unlabeled_fraction: float):
        self.labeled_ids = list(labeled.identifiers)
        self.unlabeled_ids = [i for part in unlabeled_parts for i in part.identifiers]
        self._owner = {i: labeled for i in self.labeled_ids}
        self._owner.update({i: part for part in unlabeled_parts for i in part.identifiers})
        self._labeled_set = set(self.labeled_ids)
        self.identifiers = self.labeled_ids + self.unlabeled_ids
        self.unlabeled_fraction = unlabeled_fraction

    def load_case(self, identifier: str):
        """Load from whichever folder holds the case; unlabeled cases get ``class_locations`` None (no
        labels to sample from: :class:`SemiSupervisedDataLoader` crops them at random)."""
        data, seg, seg_prev, properties = self._owner[identifier].load_case(identifier)
        if identifier not in self._labeled_set:
            properties = dict(properties, class_locations=None)
        return data, seg, seg_prev, properties


def split_batch(batch_size: int, unlabeled_fraction: float) -> tuple[int, int]:
    """(labeled, unlabeled) samples per batch: round(B * fraction) unlabeled, at least one of each."""
    n_unlabeled = min(max(1, round(batch_size * unlabeled_fraction)), max(1, batch_size - 1))
    return max(1, batch_size - n_unlabeled), n_unlabeled


class SemiSupervisedDataLoader(nnUNetDataLoader):
    """nnU-Net's loader with a fixed labeled/unlabeled split of every batch and a ``labeled`` mask.

    Labeled samples come first and follow nnU-Net's foreground oversampling; unlabeled samples are
    cropped at random and their segmentation is zeroed, so no label of an unlabeled case leaves the
    loader. Same spatial and intensity augmentation for both (nnU-Net's transforms, in its workers).
    """

    def __init__(self, data: PooledDataset, batch_size: int, *args, **kwargs):
        self.n_labeled, self.n_unlabeled = split_batch(batch_size, data.unlabeled_fraction)
        super().__init__(data, self.n_labeled + self.n_unlabeled, *args, **kwargs)
        self.get_do_oversample = self._oversample_labeled_only  # nnU-Net sets this per instance

    def get_indices(self) -> list[str]:
        """n_labeled random labeled ids, then n_unlabeled random unlabeled ids."""
        return list(np.random.choice(self._data.labeled_ids, self.n_labeled)) + \
            list(np.random.choice(self._data.unlabeled_ids, self.n_unlabeled))

    def _oversample_labeled_only(self, sample_idx: int) -> bool:
        """nnU-Net's rule within the labeled part; never for unlabeled samples."""
        if sample_idx >= self.n_labeled:
            return False
        return not sample_idx < round(self.n_labeled * (1 - self.oversample_foreground_percent))

    def get_bbox(self, data_shape, force_fg: bool, class_locations, overwrite_class=None, verbose: bool = False):
        """nnU-Net's crop; an unlabeled case (``class_locations`` None) is cropped at random even when the
        dataset has an ignore label (nnU-Net would then look for annotated voxels in the labels)."""
        if class_locations is not None:
            return super().get_bbox(data_shape, force_fg, class_locations, overwrite_class, verbose)
        if force_fg:
            raise RuntimeError("foreground oversampling was requested for an unlabeled case")
        has_ignore, self.has_ignore = self.has_ignore, False
        try:
            return super().get_bbox(data_shape, False, None, overwrite_class, verbose)
        finally:
            self.has_ignore = has_ignore

    def generate_train_batch(self) -> dict:
        """nnU-Net's batch plus ``labeled`` (bool, B); unlabeled targets are all zero."""
        batch = super().generate_train_batch()
        labeled = torch.arange(self.batch_size) < self.n_labeled
        targets = batch["target"] if isinstance(batch["target"], list) else [batch["target"]]
        for t in targets:
            t[~labeled] = 0
        batch["labeled"] = labeled
        return batch
