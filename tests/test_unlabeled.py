"""The two streams of semi-supervised training: the labeled one is nnU-Net's own loader with the supervised
twin's settings; the unlabeled one is never foreground-forced and no label ever leaves it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_ext.data.unlabeled import UnlabeledDataLoader, UnlabeledDataset


class LabeledPart:
    """A stand-in nnU-Net dataset whose cases carry labels and class locations."""

    identifiers = ["a", "b"]

    def load_case(self, identifier):
        seg = np.ones((1, 10, 6, 8), dtype=np.int16)
        return (np.random.rand(1, 10, 6, 8).astype(np.float32), seg, None,
                {"class_locations": {1: np.array([[0, 1, 1, 1]])}})


def test_unlabeled_dataset_never_returns_a_label():
    data, seg, seg_prev, properties = UnlabeledDataset([LabeledPart()]).load_case("a")
    assert seg.shape == (1, 10, 6, 8) and not seg.any() and seg_prev is None
    assert properties["class_locations"] is None
    with pytest.raises(ValueError, match="two preprocessed folders"):
        UnlabeledDataset([LabeledPart(), LabeledPart()])


def test_unlabeled_loader_random_crops_without_target_even_with_an_ignore_label():
    """With an ignore label nnU-Net crops around annotated voxels, which an unlabeled case has none of."""
    manager = LabelManager({"background": 0, "tumour": 1, "ignore": 2}, None)
    assert manager.has_ignore_label
    loader = UnlabeledDataLoader(UnlabeledDataset([LabeledPart()]), 3, (4, 4, 4), (4, 4, 4), manager)
    assert not any(loader.get_do_oversample(j) for j in range(3))
    for _ in range(5):
        batch = next(loader)
        assert "target" not in batch and batch["data"].shape == (3, 1, 4, 4, 4)
        assert set(batch["keys"]) <= {"a", "b"}


@pytest.fixture(scope="module")
def loaders(branch_dataset):
    """The loaders of ssCPCSegTrainer_3labels and of its supervised twin EncDecTrainer_3labels, fold 0,
    built in this process by nnU-Net's own trainer code."""
    from nnunetv2.run.run_training import get_trainer_from_args

    ds = branch_dataset
    saved = {k: os.environ.get(k) for k in ds["env"]}
    os.environ.update(ds["env"])
    try:
        built = {}
        for name in ("ssCPCSegTrainer_3labels_noMirroring", "EncDecTrainer_3labels_noMirroring"):
            trainer = get_trainer_from_args(str(ds["id"]), "3d_fullres", 0, name, ds["plans"],
                                            device=torch.device("cpu"))
            trainer.initialize()
            trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
            built[name.split("_")[0]] = trainer
        yield built
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.slow
def test_labeled_stream_is_nnunets_loader_with_the_twins_settings(loaders):
    ss, twin = loaders["ssCPCSegTrainer"], loaders["EncDecTrainer"]
    mine, theirs = ss.dataloader_train.data_loader, twin.dataloader_train.data_loader
    assert type(mine) is nnUNetDataLoader and type(theirs) is nnUNetDataLoader
    for attribute in ("batch_size", "oversample_foreground_percent", "patch_size", "final_patch_size", "indices"):
        assert np.array_equal(getattr(mine, attribute), getattr(theirs, attribute)), attribute
    assert len(mine.indices) == 3
    assert [type(t).__name__ for t in mine.transforms.transforms] == \
        [type(t).__name__ for t in theirs.transforms.transforms]
    assert next(ss.dataloader_train)["data"].shape == next(twin.dataloader_train)["data"].shape  # same crops
    planned, rates = mine.batch_size, {}
    for batch_size in (2, 3, 4, 5):  # forced-foreground rate of labeled samples through the loader's own hook
        for name, loader in (("ss", mine), ("twin", theirs)):
            loader.batch_size = batch_size
            rates[name] = np.mean([loader.get_do_oversample(j) for _ in range(2000) for j in range(batch_size)])
            loader.batch_size = planned
        assert rates["ss"] > 0 and abs(rates["ss"] - rates["twin"]) <= 0.02, (batch_size, rates)


@pytest.mark.slow
def test_unlabeled_stream_uses_the_pool_without_labels_or_foreground(loaders, branch_dataset):
    ss = loaders["ssCPCSegTrainer"]
    info = json.load(open(os.path.join(ss.output_folder, "unlabeled_cases.json")))
    loader = ss.dataloader_unlabeled.data_loader
    assert type(loader) is UnlabeledDataLoader and loader.batch_size == ss.batch_size == info["unlabeled_per_step"]
    assert sorted(loader.indices) == sorted(info["unlabeled"])
    assert not any(loader.get_do_oversample(j) for j in range(loader.batch_size))
    labeled_batch = next(ss.dataloader_train)
    for _ in range(3):
        batch = next(ss.dataloader_unlabeled)
        assert "target" not in batch and set(batch["keys"]) <= set(info["unlabeled"])
        assert batch["data"].shape == labeled_batch["data"].shape  # same patch size and augmentation output
    beyond = next(i for i in info["unlabeled"] if info["source"][i].startswith("fold training"))
    seg = loader._data.load_case(beyond)[1]
    own = ss.dataset_class(ss.preprocessed_dataset_folder, [beyond]).load_case(beyond)[1]
    assert np.asarray(own).max() > 0 and not seg.any()  # its real labels never leave the loader
