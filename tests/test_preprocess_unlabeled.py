"""preprocess-unlabeled: equals nnU-Net's preprocessing, is idempotent and rejects bad input by file name."""

from __future__ import annotations

import os
import shutil

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.data.pool import unlabeled_folder
from nnunet_ext.data.preprocess_unlabeled import load_checked, preprocess_unlabeled, raw_cases


def write(path, array, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(array.astype(np.float32))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def test_bad_inputs_name_the_file(tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    folder = tmp_path / "imagesUnlabeled"
    folder.mkdir()
    ok = np.random.rand(6, 7, 8)
    write(folder / "A_0000.nii.gz", ok)
    write(folder / "A_0001.nii.gz", ok)
    write(folder / "B_0000.nii.gz", ok)
    with pytest.raises(ValueError, match="case 'B' has channel files \\[0\\].*2 channels"):
        raw_cases(str(folder), ".nii.gz", 2)
    (folder / "B_0000.nii.gz").unlink()
    assert list(raw_cases(str(folder), ".nii.gz", 2)) == ["A"]
    reader = SimpleITKIO()
    write(tmp_path / "small.nii.gz", ok[:5])
    with pytest.raises(ValueError, match="small.nii.gz: shape"):
        load_checked([str(folder / "A_0000.nii.gz"), str(tmp_path / "small.nii.gz")], reader)
    write(tmp_path / "coarse.nii.gz", ok, spacing=(1.0, 1.0, 3.0))
    with pytest.raises(ValueError, match="coarse.nii.gz: spacing \\(3.0, 1.0, 1.0\\) differs"):
        load_checked([str(folder / "A_0000.nii.gz"), str(tmp_path / "coarse.nii.gz")], reader)
    bad = ok.copy()
    bad[1, 2, 3] = np.nan
    write(tmp_path / "nan.mha", bad)
    with pytest.raises(ValueError, match="nan.mha: contains NaN or infinite"):
        load_checked([str(tmp_path / "nan.mha")], reader)
    nibabel.save(nibabel.Nifti1Image(bad.astype(np.float32), np.eye(4)), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(ValueError, match="nan.nii.gz: contains NaN or infinite"):  # SimpleITK reads it as 0
        load_checked([str(tmp_path / "nan.nii.gz")], reader)
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.nii.gz: cannot be read"):
        load_checked([str(tmp_path / "broken.nii.gz")], reader)
    data, props = load_checked([str(folder / "A_0000.nii.gz"), str(folder / "A_0001.nii.gz")], reader)
    assert data.shape == (2, 6, 7, 8) and "spacing" in props


@pytest.mark.slow
def test_preprocessing_matches_nnunet_is_idempotent_and_loses_nothing(branch_dataset, tmp_path, monkeypatch):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    ds = branch_dataset
    name = os.path.basename(ds["raw"])
    # work on a copy so the shared fixture stays intact
    raw_root, pre_root = tmp_path / "raw", tmp_path / "pre"
    shutil.copytree(ds["raw"], raw_root / name)
    shutil.copytree(ds["preprocessed"], pre_root / name)
    monkeypatch.setenv("nnUNet_raw", str(raw_root))
    monkeypatch.setenv("nnUNet_preprocessed", str(pre_root))
    folder = unlabeled_folder(str(pre_root / name), f"{ds['plans']}_3d_fullres")
    labeled_folder = str(pre_root / name / f"{ds['plans']}_3d_fullres")

    # LEAKVAL is a copy of a labeled training case: same preprocessing result as nnU-Net's
    original = ds["leaks"]["LEAKVAL"]
    mine = nnUNetDatasetBlosc2(folder, ["LEAKVAL"]).load_case("LEAKVAL")
    theirs = nnUNetDatasetBlosc2(labeled_folder, [original]).load_case(original)
    np.testing.assert_array_equal(np.asarray(mine[0]), np.asarray(theirs[0]))
    assert mine[3]["class_locations"] == {} and mine[3]["spacing"] == theirs[3]["spacing"]

    before = {f: os.path.getmtime(os.path.join(folder, f)) for f in os.listdir(folder)}
    preprocess_unlabeled(ds["id"], ["3d_fullres"], ds["plans"])  # idempotent: nothing redone
    assert {f: os.path.getmtime(os.path.join(folder, f)) for f in os.listdir(folder)} == before

    for c in range(4):  # SimpleITK would read inf as 0: write with nibabel, as scanners' tools do
        source = nibabel.load(str(raw_root / name / "imagesUnlabeled" / f"LEAKVAL_{c:04d}.nii.gz"))
        image = np.asarray(source.dataobj, dtype=np.float32)
        image[0, 0, 0] = np.inf
        nibabel.save(nibabel.Nifti1Image(image, source.affine), str(raw_root / name / "imagesUnlabeled" /
                                                                    f"ZBAD_{c:04d}.nii.gz"))
    with pytest.raises(ValueError, match="ZBAD_0000.nii.gz: contains NaN or infinite"):
        preprocess_unlabeled(ds["id"], ["3d_fullres"], ds["plans"])
    after = {f: os.path.getmtime(os.path.join(folder, f)) for f in os.listdir(folder)}
    assert after == before  # nothing lost, nothing half-written
