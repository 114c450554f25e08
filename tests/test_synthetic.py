"""The demo dataset is a valid, deterministic nnU-Net region dataset with nested tumour labels."""

import json
import os

import numpy as np
import SimpleITK as sitk

from nnunet_ext.datasets.synthetic import make_case, make_demo_dataset


def test_case_labels_nested_and_channels_informative():
    image, label = make_case(np.random.RandomState(3), (40, 40, 40))
    assert image.shape == (4, 40, 40, 40) and image.dtype == np.float32 and np.isfinite(image).all()
    assert set(np.unique(label)) == {0, 1, 2, 3}
    brain = image[0] != 0
    contrast = np.array([[abs(image[c][label == lab].mean() / image[c][brain & (label == 0)].mean() - 1)
                          for c in range(4)] for lab in (1, 2, 3)])
    assert (contrast.max(axis=1) > 0.2).all()  # every tumour label is visible in some channel
    assert (contrast.max(axis=0) > 0.2).all()  # every channel carries some tumour contrast


def test_dataset_is_deterministic_and_passes_nnunet_integrity_check(tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    a = make_demo_dataset(901, str(tmp_path / "a"), num_train=4, num_test=2, num_unlabeled=2,
                          shape=(24, 24, 24), seed=5, verbose=False)
    b = make_demo_dataset(901, str(tmp_path / "b"), num_train=4, num_test=2, num_unlabeled=2,
                          shape=(24, 24, 24), seed=5, verbose=False)
    verify_dataset_integrity(a, num_processes=1)
    ds = json.load(open(os.path.join(a, "dataset.json")))
    assert ds["labels"]["tumor core"] == [2, 3] and ds["regions_class_order"] == [1, 2, 3]
    ids = {split: sorted({f[:8] for f in os.listdir(os.path.join(a, split))})
           for split in ("imagesTr", "imagesTs", "imagesUnlabeled")}
    assert sum(map(len, ids.values())) == len(set().union(*map(set, ids.values()))) == 8
    assert sorted(os.listdir(os.path.join(a, "labelsTs"))) == [f"{i}.nii.gz" for i in ids["imagesTs"]]
    for rel in ("imagesTr/DEMO_000_0002.nii.gz", "labelsTr/DEMO_003.nii.gz"):
        x, y = (sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(d, rel))) for d in (a, b))
        np.testing.assert_array_equal(x, y)
