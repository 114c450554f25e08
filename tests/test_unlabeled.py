"""The semi-supervised loader: labeled and unlabeled samples drawn as documented, no label of an unlabeled case
leaves it."""

from __future__ import annotations

import os

import numpy as np
import pytest

from nnunet_ext.data.pool import unlabeled_folder
from nnunet_ext.data.unlabeled import PooledDataset, SemiSupervisedDataLoader, split_batch


def test_split_batch():
    assert split_batch(2, 0.5) == (1, 1)
    assert split_batch(8, 0.25) == (6, 2)
    assert split_batch(2, 0.9) == (1, 1)  # at least one of each
    assert split_batch(1, 0.5) == (1, 1)


def test_unlabeled_crops_are_random_even_with_an_ignore_label():
    """With an ignore label nnU-Net crops around annotated voxels, which an unlabeled case has none of."""
    loader = object.__new__(SemiSupervisedDataLoader)
    loader.__dict__.update(patch_size=[4, 4, 4], need_to_pad=np.array([0, 0, 0]), has_ignore=True,
                           annotated_classes_key=(-1, 0, 1))
    np.random.seed(0)
    for _ in range(20):
        lbs, ubs = loader.get_bbox(np.array([10, 6, 4]), False, None)
        assert all(0 <= lo and hi <= s and hi - lo == 4 for lo, hi, s in zip(lbs, ubs, (10, 6, 4)))
    assert loader.has_ignore  # restored
    with pytest.raises(RuntimeError, match="foreground oversampling"):
        loader.get_bbox(np.array([10, 6, 4]), True, None)
    with pytest.raises(KeyError):  # what an unlabeled case's empty class_locations gave before
        loader.get_bbox(np.array([10, 6, 4]), False, {})


@pytest.mark.slow
def test_loader_mixes_labeled_and_unlabeled(branch_dataset):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    ds = branch_dataset
    pm = PlansManager(os.path.join(ds["preprocessed"], f"{ds['plans']}.json"))
    import json
    lm = pm.get_label_manager(json.load(open(os.path.join(ds["preprocessed"], "dataset.json"))))
    labeled_folder = os.path.join(ds["preprocessed"], f"{ds['plans']}_3d_fullres")
    folder = unlabeled_folder(ds["preprocessed"], f"{ds['plans']}_3d_fullres")
    train = ds["splits"][0]["train"]
    labeled = nnUNetDatasetBlosc2(labeled_folder, train[:3])
    parts = [nnUNetDatasetBlosc2(labeled_folder, train[3:5]), nnUNetDatasetBlosc2(folder, ["DEMO_012"])]
    pooled = PooledDataset(labeled, parts, unlabeled_fraction=0.5)
    assert pooled.load_case("DEMO_012")[3]["class_locations"] is None
    assert pooled.load_case(train[0])[3]["class_locations"]  # labeled cases keep nnU-Net's
    loader = SemiSupervisedDataLoader(pooled, 4, (48, 48, 48), (48, 48, 48), lm, oversample_foreground_percent=1.0)
    assert [loader.get_do_oversample(j) for j in range(4)] == [True, True, False, False]
    for _ in range(3):
        batch = next(loader)
        assert batch["labeled"].tolist() == [True, True, False, False]
        assert set(batch["keys"][:2]) <= set(train[:3]) and set(batch["keys"][2:]) <= {*train[3:5], "DEMO_012"}
        assert (batch["target"][2:] == 0).all() and batch["data"].shape[0] == 4
        assert (batch["target"][:2] > 0).any()  # oversampled labeled patches hold foreground
