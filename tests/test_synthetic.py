"""The demo dataset is a valid, deterministic nnU-Net region dataset with nested tumour labels."""

import json
import os

import numpy as np
import pytest
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


def test_variety_draws_tumour_counts_brain_sizes_and_contrasts_a_few_cases_do_not_show():
    from scipy.ndimage import label as components

    def stats(variety: bool) -> tuple[list[int], list[int], list[float]]:
        tumours, extents, contrasts = [], [], []
        for seed in range(10):
            image, label = make_case(np.random.RandomState(seed), (32, 48, 64), variety=variety)
            tumours.append(components(label > 0)[1])
            extents.append(int((image[0] != 0).any(axis=(0, 1)).sum()))
            brain = (image[0] != 0) & (label == 0)
            contrasts.append(float(image[0][label == 1].mean() / image[0][brain].mean()))  # edema in FLAIR
        return tumours, extents, contrasts

    plain, varied = stats(False), stats(True)
    assert max(plain[0]) == 1 and max(varied[0]) >= 2  # one tumour per case, or several
    assert np.std(varied[1]) > 2 * np.std(plain[1])  # brain sizes
    assert np.std(varied[2]) > 2 * np.std(plain[2])  # per-site tissue contrast


def test_dataset_is_deterministic_and_passes_nnunet_integrity_check(tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    a = make_demo_dataset(901, str(tmp_path / "a"), num_train=5, num_test=2, num_unlabeled=2,
                          shape=(24, 24, 24), seed=5, verbose=False)
    b = make_demo_dataset(901, str(tmp_path / "b"), num_train=5, num_test=2, num_unlabeled=2,
                          shape=(24, 24, 24), seed=5, verbose=False)
    verify_dataset_integrity(a, num_processes=1)
    ds = json.load(open(os.path.join(a, "dataset.json")))
    assert ds["labels"]["tumor core"] == [2, 3] and ds["regions_class_order"] == [1, 2, 3]
    ids = {split: sorted({f[:8] for f in os.listdir(os.path.join(a, split))})
           for split in ("imagesTr", "imagesTs", "imagesUnlabeled")}
    assert sum(map(len, ids.values())) == len(set().union(*map(set, ids.values()))) == 9
    assert sorted(os.listdir(os.path.join(a, "labelsTs"))) == [f"{i}.nii.gz" for i in ids["imagesTs"]]
    for rel in ("imagesTr/DEMO_000_0002.nii.gz", "labelsTr/DEMO_003.nii.gz"):
        x, y = (sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(d, rel))) for d in (a, b))
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("arguments, message", [
    ({"num_test": -1}, "--num-test must be >= 0, got -1"),
    ({"num_unlabeled": -2}, "--num-unlabeled must be >= 0, got -2"),
    ({"shape": (0, 4, 4)}, "--shape needs 3 sizes >= 16 voxels \\(Z Y X\\), got 0 4 4"),
    ({"num_train": 2}, "--num-train must be >= 5 \\(nnU-Net's 5-fold split"),
    ({"spacing": (1.0, 0.0, 1.0)}, "--spacing needs 3 positive sizes"),
    ({"dataset_id": 1000}, "-d must lie in 1..999, got 1000"),
    ({"seed": -1}, "--seed must lie in 0..2\\*\\*32-1"),
])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, arguments, message):
    kwargs = {"dataset_id": 902, "raw_folder": str(tmp_path), "num_train": 5, "num_test": 0, "num_unlabeled": 0,
              "shape": (16, 16, 16), "verbose": False, **arguments}
    with pytest.raises(ValueError, match=message):
        make_demo_dataset(**kwargs)
    assert list(tmp_path.iterdir()) == []  # nothing that would block the corrected rerun
