"""MSD Task01 conversion on a tiny fake MSD folder: geometry, content, labels, splits, errors, CLI hooks."""

import argparse
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

from nnunet_ext.datasets import msd

SIZE = (8, 9, 7)  # SimpleITK (x, y, z); arrays are (z, y, x)
SPACING = (1.5, 2.0, 2.5)
ORIGIN = (10.0, -20.0, 30.0)
DIRECTION = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
MODALITY = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
LABELED = [f"BRATS_{i:03d}" for i in range(1, 8)]  # 7: 2 test cases leave the 5 that 5 folds need
UNLABELED = ["BRATS_008", "BRATS_009"]


def _volume(case: str) -> np.ndarray:
    """Deterministic random 4-channel array (channel, z, y, x) of one fake case."""
    seed = int(case.split("_")[1])
    return np.random.default_rng(seed).normal(size=(4, *SIZE[::-1])).astype(np.float32)


def _labels(case: str) -> np.ndarray:
    """Deterministic random MSD label map (z, y, x) with values 0..3."""
    seed = 100 + int(case.split("_")[1])
    return np.random.default_rng(seed).integers(0, 4, size=SIZE[::-1]).astype(np.uint8)


def _write_4d(array: np.ndarray, path) -> None:
    """Write a (channel, z, y, x) array as a 4D NIfTI with the fake geometry."""
    image = sitk.JoinSeries([sitk.GetImageFromArray(c) for c in array])
    direction = np.eye(4)
    direction[:3, :3] = DIRECTION
    image.SetSpacing((*SPACING, 1.0))
    image.SetOrigin((*ORIGIN, 0.0))
    image.SetDirection(direction.flatten().tolist())
    sitk.WriteImage(image, str(path))


def _write_label(array: np.ndarray, path) -> None:
    """Write a 3D label map with the fake geometry."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION.flatten().tolist())
    sitk.WriteImage(image, str(path))


@pytest.fixture(scope="module")
def msd_folder(tmp_path_factory):
    """A fake Task01_BrainTumour folder: 7 labeled and 2 unlabeled 8×9×7×4 cases, MSD dataset.json."""
    root = tmp_path_factory.mktemp("msd") / "Task01_BrainTumour"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True)
    for case in LABELED:
        _write_4d(_volume(case), root / "imagesTr" / f"{case}.nii.gz")
        _write_label(_labels(case), root / "labelsTr" / f"{case}.nii.gz")
    for case in UNLABELED:
        _write_4d(_volume(case), root / "imagesTs" / f"{case}.nii.gz")
    (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"macOS resource fork, ignored")
    dataset = {
        "name": "BRATS",
        "licence": "CC-BY-SA 4.0",
        "modality": MODALITY,
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": len(LABELED),
        "numTest": len(UNLABELED),
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in LABELED],
        "test": [f"./imagesTs/{c}.nii.gz" for c in UNLABELED],
    }
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root


@pytest.fixture(scope="module")
def converted(msd_folder, tmp_path_factory):
    """The fake folder converted with a seeded 2-case test split."""
    raw = tmp_path_factory.mktemp("raw")
    return msd.convert_msd_brain_tumour(msd_folder, dataset_id=7, raw_folder=raw, test_size=2, seed=3)


def _copy_with(msd_folder, tmp_path, edit) -> object:
    """Copy the fake MSD folder, apply ``edit(copy)`` and return the copy."""
    copy = tmp_path / "Task01_BrainTumour"
    shutil.copytree(msd_folder, copy)
    edit(copy)
    return copy


def _ids(folder, suffix: str) -> set[str]:
    """Case ids of the files ``{id}{suffix}`` in ``folder``."""
    return {p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}")}


def test_layout_and_split(converted):
    assert converted.name == "Dataset007_BrainTumour"
    split = json.loads((converted / "split.json").read_text())
    assert len(split["train"]) == 5 and len(split["test"]) == 2 and split["unlabeled"] == UNLABELED
    assert sorted(split["train"] + split["test"]) == LABELED
    assert split["source"] == "random" and split["seed"] == 3
    assert _ids(converted / "imagesTr", "_0000.nii.gz") == set(split["train"])
    assert _ids(converted / "labelsTr", ".nii.gz") == set(split["train"])
    assert _ids(converted / "imagesTs", "_0003.nii.gz") == set(split["test"])
    assert _ids(converted / "labelsTs", ".nii.gz") == set(split["test"])
    assert _ids(converted / "imagesUnlabeled", "_0002.nii.gz") == set(UNLABELED)
    assert not _ids(converted / "imagesTr", "_0001.nii.gz") & set(split["test"] + UNLABELED)
    assert len(list((converted / "imagesTr").iterdir())) == 5 * 4


def test_channels_keep_geometry_and_content(converted):
    for folder, case in (
        ("imagesTr", json.loads((converted / "split.json").read_text())["train"][0]),
        ("imagesUnlabeled", "BRATS_008"),
    ):
        volume = _volume(case)
        for c in range(4):
            image = sitk.ReadImage(str(converted / folder / f"{case}_{c:04d}.nii.gz"))
            assert image.GetSize() == SIZE
            np.testing.assert_allclose(image.GetSpacing(), SPACING)
            np.testing.assert_allclose(image.GetOrigin(), ORIGIN)
            np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), DIRECTION, atol=1e-6)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume[c])


def test_labels_unchanged_uint8(converted):
    split = json.loads((converted / "split.json").read_text())
    for folder, case in (("labelsTr", split["train"][1]), ("labelsTs", split["test"][0])):
        label = sitk.ReadImage(str(converted / folder / f"{case}.nii.gz"))
        assert label.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label), _labels(case))


def test_dataset_json_and_nnunet_integrity(converted):
    dataset = json.loads((converted / "dataset.json").read_text())
    assert dataset["channel_names"] == MODALITY
    assert dataset["labels"] == {
        "background": 0,
        "whole tumor": [1, 2, 3],
        "tumor core": [2, 3],
        "enhancing tumor": [3],
    }
    assert dataset["regions_class_order"] == [1, 2, 3]
    assert dataset["numTraining"] == 5 and dataset["file_ending"] == ".nii.gz"
    verify_dataset_integrity(str(converted), num_processes=1)


def test_same_seed_same_split(msd_folder, converted, tmp_path):
    again = msd.convert_msd_brain_tumour(msd_folder, 7, tmp_path, test_size=2, seed=3, num_processes=2)
    assert (again / "split.json").read_text().replace(str(tmp_path), "") == (
        (converted / "split.json").read_text().replace(str(converted.parent), "")
    )
    draws = {tuple(msd.choose_test_ids(LABELED, 2, seed)) for seed in range(20)}
    assert len(draws) > 1


def test_split_leaving_fewer_training_cases_than_five_folds_need_is_refused(msd_folder, tmp_path):
    with pytest.raises(ValueError, match=r"--test-size 7 leaves 0 of the 7 labeled cases for training, but nnU-Net's "
                                         r"5-fold cross-validation needs at least 5; hold out at most 2 cases"):
        msd.convert_msd_brain_tumour(msd_folder, 2, tmp_path / "raw", test_size=7)
    (tmp_path / "ids.json").write_text(json.dumps(LABELED[:3]))
    with pytest.raises(ValueError, match=r"--test-ids .*ids.json leaves 4 of the 7"):
        msd.convert_msd_brain_tumour(msd_folder, 2, tmp_path / "raw", test_ids_file=tmp_path / "ids.json")
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("as_dict", [False, True])
def test_explicit_test_ids(msd_folder, tmp_path, as_dict):
    ids = ["BRATS_005", "BRATS_002"]
    content = {"train": ["BRATS_001"], "val": ["BRATS_003"], "test": ids} if as_dict else ids
    (tmp_path / "ids.json").write_text(json.dumps(content))
    target = msd.convert_msd_brain_tumour(
        msd_folder, 2, tmp_path / "raw", test_ids_file=tmp_path / "ids.json", num_processes=1
    )
    split = json.loads((target / "split.json").read_text())
    assert split["test"] == sorted(ids) and split["source"] == str(tmp_path / "ids.json")
    assert split["train"] == ["BRATS_001", "BRATS_003", "BRATS_004", "BRATS_006", "BRATS_007"]
    assert _ids(target / "labelsTs", ".nii.gz") == set(ids)


def test_convert_msd_test_ids_paper_on_other_data_names_the_file(msd_folder, tmp_path):
    with pytest.raises(ValueError, match="pfn_split_cv0.json: test ids must be distinct MSD training cases"):
        msd.convert_msd_brain_tumour(msd_folder, 2, tmp_path / "raw", test_ids_file="paper", num_processes=1)


def test_unknown_test_id_is_rejected(msd_folder, tmp_path):
    (tmp_path / "ids.json").write_text(json.dumps(["BRATS_001", "BRATS_999"]))
    with pytest.raises(ValueError, match="BRATS_999"):
        msd.convert_msd_brain_tumour(msd_folder, 1, tmp_path, test_ids_file=tmp_path / "ids.json")
    assert not (tmp_path / "Dataset001_BrainTumour").exists()


def test_target_folder_rules(msd_folder, tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(ValueError, match="nnUNet_raw"):
        msd.target_folder(1, None)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    assert msd.target_folder(4, None) == tmp_path / "Dataset004_BrainTumour"
    (tmp_path / "Dataset004_BrainTumour").mkdir()
    (tmp_path / "Dataset004_BrainTumour" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        msd.convert_msd_brain_tumour(msd_folder, 4, test_size=1)
    assert (tmp_path / "Dataset004_BrainTumour" / "keep.txt").read_text() == "mine"
    target = msd.convert_msd_brain_tumour(msd_folder, 4, test_size=1, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "dataset.json").is_file()
    (tmp_path / "Dataset005_Other").mkdir()
    with pytest.raises(FileExistsError, match="Dataset005_Other"):
        msd.convert_msd_brain_tumour(msd_folder, 5, test_size=1)


def test_missing_dataset_json(msd_folder, tmp_path):
    folder = _copy_with(msd_folder, tmp_path, lambda c: (c / "dataset.json").unlink())
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        msd.convert_msd_brain_tumour(folder, 1, tmp_path / "raw")


def test_image_without_label(msd_folder, tmp_path):
    folder = _copy_with(msd_folder, tmp_path, lambda c: (c / "labelsTr" / "BRATS_004.nii.gz").unlink())
    with pytest.raises(FileNotFoundError, match="BRATS_004"):
        msd.convert_msd_brain_tumour(folder, 1, tmp_path / "raw")
    shutil.copy(folder / "imagesTs" / "BRATS_008.nii.gz", folder / "imagesTr" / "BRATS_010.nii.gz")
    (folder / "labelsTr" / "BRATS_004.nii.gz").write_bytes(
        (msd_folder / "labelsTr" / "BRATS_004.nii.gz").read_bytes()
    )
    with pytest.raises(ValueError, match="BRATS_010"):
        msd.convert_msd_brain_tumour(folder, 1, tmp_path / "raw")


def test_wrong_number_of_channels(msd_folder, tmp_path):
    folder = _copy_with(
        msd_folder,
        tmp_path,
        lambda c: _write_4d(_volume("BRATS_003")[:3], c / "imagesTr" / "BRATS_003.nii.gz"),
    )
    with pytest.raises(ValueError, match=r"BRATS_003.*\(x, y, z, 4\)"):
        msd.convert_msd_brain_tumour(folder, 1, tmp_path / "raw", test_size=0, num_processes=1)


def test_swapped_msd_labels_are_rejected(msd_folder, tmp_path):
    def swap(copy):
        dataset = json.loads((copy / "dataset.json").read_text())
        dataset["labels"]["2"], dataset["labels"]["3"] = dataset["labels"]["3"], dataset["labels"]["2"]
        (copy / "dataset.json").write_text(json.dumps(dataset))

    with pytest.raises(ValueError, match="labels"):
        msd.convert_msd_brain_tumour(_copy_with(msd_folder, tmp_path, swap), 1, tmp_path / "raw")


def test_unexpected_label_value(msd_folder, tmp_path):
    folder = _copy_with(
        msd_folder,
        tmp_path,
        lambda c: _write_label(np.full(SIZE[::-1], 4, dtype=np.uint8), c / "labelsTr" / "BRATS_001.nii.gz"),
    )
    with pytest.raises(ValueError, match=r"BRATS_001.*\[4\]"):
        msd.convert_msd_brain_tumour(folder, 1, tmp_path / "raw", test_size=0, num_processes=1)


@pytest.mark.parametrize("damaged", ["imagesTr/BRATS_004.nii.gz", "labelsTr/BRATS_005.nii.gz"])
def test_failing_conversion_leaves_no_partial_dataset_and_keeps_the_old_one(msd_folder, tmp_path, damaged):
    def truncate(copy):
        intact = (copy / damaged).read_bytes()
        (copy / damaged).write_bytes(intact[: len(intact) // 2])  # SimpleITK would read the rest as 0

    folder = _copy_with(msd_folder, tmp_path, truncate)
    raw = tmp_path / "raw"
    with pytest.raises(ValueError, match=f"{damaged}: truncated or damaged file"):
        msd.convert_msd_brain_tumour(folder, 3, raw, test_size=0, num_processes=1)
    assert list(raw.iterdir()) == []  # neither a partial dataset nor the staging folder
    target = msd.convert_msd_brain_tumour(msd_folder, 3, raw, test_size=0, num_processes=1)
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=damaged):
        msd.convert_msd_brain_tumour(folder, 3, raw, test_size=0, overwrite=True, num_processes=2)
    assert {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert [p.name for p in raw.iterdir()] == [target.name]


def test_cli_hooks(msd_folder, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    msd.add_arguments(parser)
    args = parser.parse_args(
        ["-i", str(msd_folder), "-d", "9", "-o", str(tmp_path), "--test-size", "2", "--seed", "1", "-np", "1"]
    )
    assert msd.run(args) == 0
    split = json.loads((tmp_path / "Dataset009_BrainTumour" / "split.json").read_text())
    assert len(split["test"]) == 2 and split["seed"] == 1
    output = capsys.readouterr().out
    assert "training cases: 5/5" in output and "Dataset009_BrainTumour" in output
    with pytest.raises(SystemExit):
        parser.parse_args(["-i", "x", "--test-size", "3", "--test-ids", "ids.json"])
