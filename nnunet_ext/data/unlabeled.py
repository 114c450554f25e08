"""The unlabeled stream of semi-supervised training: a dataset and loader that never carry a label.

The labeled stream is nnU-Net's own ``nnUNetDataLoader`` over the budget's cases, untouched. The
unlabeled stream draws, with the same patch size, workers and augmentation, from the fold's unlabeled
pool (:mod:`nnunet_ext.data.pool`): random crops only, and a segmentation of zeros for every case, so no
label (e.g. of a fold training case beyond the budget) ever leaves the loader.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

from nnunet_ext.compat import random_crops_only


def folder_dataset_class(folder: str) -> type | None:
    """nnU-Net's dataset class for the cases of a preprocessed folder (``infer_dataset_class``, as nnU-Net reads its
    own folders), or None when the folder holds no complete case."""
    if not os.path.isdir(folder) or not any(name.endswith(".pkl") for name in os.listdir(folder)):
        return None
    try:
        return infer_dataset_class(folder)
    except (AssertionError, KeyError) as error:
        raise ValueError(f"{folder}: its cases are not in one file format that nnU-Net reads ({error!r}); delete "
                         f"the folder and rerun 'nnunet-ext preprocess-unlabeled'") from None


class CaseUnion:
    """nnU-Net's dataset interface (``identifiers``, ``load_case``) over nnU-Net datasets of several preprocessed
    folders, e.g. a fold's labeled cases plus pseudo-labeled ones; a case id may appear in one folder only."""

    def __init__(self, parts: Sequence):
        self._owner = {i: part for part in parts for i in part.identifiers}
        self.identifiers = [i for part in parts for i in part.identifiers]
        if len(self._owner) != len(self.identifiers):
            repeated = sorted({i for i in self.identifiers if self.identifiers.count(i) > 1})
            raise ValueError(f"case ids {repeated[:10]} appear in two preprocessed folders")

    def __len__(self) -> int:
        return len(self.identifiers)

    def load_case(self, identifier: str):
        """(data, seg, seg_prev, properties) of a case, from the folder that holds it."""
        return self._owner[identifier].load_case(identifier)


class UnlabeledDataset(CaseUnion):
    """Unlabeled case ids that may live in several preprocessed folders.

    ``load_case`` returns the image and a zero segmentation of the same spatial shape; the properties have
    ``class_locations`` None (there is nothing to sample foreground from).
    """

    def load_case(self, identifier: str):
        """(data, zero segmentation, None, properties) of an unlabeled case."""
        data, _, _, properties = super().load_case(identifier)
        seg = np.zeros((1, *data.shape[1:]), dtype=np.int16)
        return data, seg, None, dict(properties, class_locations=None)


class UnlabeledDataLoader(nnUNetDataLoader):
    """nnU-Net's loader for the unlabeled stream: random crops only (never around foreground, nor around annotated
    voxels on datasets with an ignore label: both need labels), batches without a ``target``."""

    def __init__(self, data: UnlabeledDataset, batch_size: int, patch_size, final_patch_size, label_manager,
                 transforms=None):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, transforms=transforms)
        random_crops_only(self)

    def generate_train_batch(self) -> dict:
        """nnU-Net's batch of augmented images; the (all-zero) segmentation is dropped."""
        batch = super().generate_train_batch()
        del batch["target"]
        return batch
