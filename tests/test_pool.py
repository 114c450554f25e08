"""The unlabeled pool: validation cases, the test split and copies of either never enter it, and no
imagesUnlabeled case enters it without a duplicate check that knew every such case."""

from __future__ import annotations

import json
import os

import pytest

from nnunet_ext.data.duplicates import CONTENT_SCHEME
from nnunet_ext.data.pool import DuplicateCheck, build_pool, load_manifest, raw_test_ids, record_path

KNOWN = frozenset({"a", "b", "v1", "v2", "t1", "t2", "l1", "l2", "zz", "p"})


def checks(copies: dict[str, tuple[str, ...]], ids: list[str], known: frozenset[str] = KNOWN) -> dict:
    """A duplicate check for every id: the given copies, compared with ``known``."""
    return {i: DuplicateCheck(copies.get(i, ()), known) for i in ids}


def test_pool_excludes_validation_test_and_copies():
    folder_ids = ["u1", "u2", "t1", "copy_v", "copy_t", "a", "l1", "copy_l", "copy_b", "copy_tr"]
    pool = build_pool(beyond_budget=["a", "b", "v1"], folder_ids=folder_ids,
                      labeled=["l1", "l2"], validation=["v1", "v2"], test={"t1", "t2"},
                      duplicates=checks({"copy_v": ("imagesTr/v2",), "copy_t": ("imagesTs/t2",), "u2": ("imagesTr/zz",),
                                         "copy_l": ("imagesTr/l2",), "copy_b": ("imagesTr/b",),
                                         "copy_tr": ("imagesTr/zz", "imagesTs/p")}, folder_ids))
    assert sorted(pool.ids) == ["a", "b", "u1", "u2"]
    assert set(pool.excluded) == {"v1", "t1", "copy_v", "copy_t", "l1", "imagesUnlabeled/a", "copy_l", "copy_b",
                                  "copy_tr"}
    assert "validation" in pool.excluded["copy_v"] and "test" in pool.excluded["copy_t"]
    assert pool.excluded["copy_l"] == "imagesUnlabeled image is a labeled training case of this fold"
    assert "copy of imagesTr/b, a fold training case already in the pool" in pool.excluded["copy_b"]
    assert "copy of imagesTs/p" in pool.excluded["copy_tr"]  # any copy of an imagesTs image is excluded
    assert pool.source["a"].startswith("fold training") and pool.source["u1"] == "imagesUnlabeled"
    assert pool.select(2) == pool.ids[:2] and pool.select(None) == pool.ids
    with pytest.raises(ValueError, match="5 unlabeled images requested but the pool has only 4"):
        pool.select(5)
    again = build_pool(["a", "b"], ["u1", "u2"], [], [], set(), checks({}, ["u1", "u2"]))
    assert again.ids == build_pool(["b", "a"], ["u2", "u1"], [], [], set(), checks({}, ["u2", "u1"])).ids


def test_cases_without_a_check_or_with_a_stale_one_are_refused():
    with pytest.raises(ValueError, match=r"cases \['u2'\] have no duplicate check.*rerun 'nnunet-ext "
                                         r"preprocess-unlabeled'"):
        build_pool(["a"], ["u1", "u2"], ["l1"], ["v1"], {"t1"}, checks({}, ["u1"]))
    with pytest.raises(ValueError, match="have no duplicate check"):  # no manifest at all
        build_pool(["a"], ["u1"], ["l1"], ["v1"], {"t1"})
    with pytest.raises(ValueError, match=r"cases \['u1'\] were checked for copies before the cases \['t9'\] existed"):
        build_pool(["a"], ["u1"], ["l1"], ["v1"], {"t1", "t9"}, checks({}, ["u1"]))
    assert build_pool(["a"], [], ["l1"], ["v1"], {"t9"}).ids == ["a"]  # no imagesUnlabeled: nothing to check


def test_manifest_is_read_from_the_records(tmp_path):
    assert load_manifest(str(tmp_path / "missing")) == {}
    (tmp_path / "manifest").mkdir()
    for case, scheme in (("U1", CONTENT_SCHEME), ("OLD", 1)):
        with open(record_path(str(tmp_path), case), "w") as f:
            json.dump({"duplicate_of": ["imagesTs/T1"], "checked_against": ["T1", "A"], "channels": [],
                       "content_scheme": scheme}, f)
    # a record of an older rule (blind to copies with an edited header) counts as no check: the trainer refuses it
    assert load_manifest(str(tmp_path)) == {"U1": DuplicateCheck(("imagesTs/T1",), frozenset({"T1", "A"}))}


def test_test_split_is_read_from_the_raw_dataset_and_a_missing_dataset_folder_is_refused(tmp_path):
    raw = tmp_path / "Dataset001_X"
    (raw / "imagesTr").mkdir(parents=True)
    assert raw_test_ids(str(raw), ".nii.gz") == set()  # no imagesTs/labelsTs: an empty test split
    (raw / "imagesTs").mkdir()
    (raw / "labelsTs").mkdir()
    for name in ("imagesTs/T1_0000.nii.gz", "imagesTs/T1_0001.nii.gz", "imagesTs/T2_0000.nii.gz", "labelsTs/T3.nii.gz",
                 "labelsTs/readme.txt"):
        (raw / name).touch()
    assert raw_test_ids(str(raw), ".nii.gz") == {"T1", "T2", "T3"}
    with pytest.raises(FileNotFoundError, match=r"Dataset002_Y does not exist.*set nnUNet_raw to the folder that "
                                                r"holds Dataset002_Y"):
        raw_test_ids(str(tmp_path / "Dataset002_Y"), ".nii.gz")


def test_unlabeled_trainers_refuse_to_train_when_the_test_split_cannot_be_read(make_trainer, tiny_dataset,
                                                                              monkeypatch, tmp_path):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    trainer = make_trainer("ssVAESegTrainer_3labels")
    test = {f[:-len(".nii.gz")] for f in os.listdir(os.path.join(tiny_dataset["raw"], "labelsTs"))}
    assert len(test) == 2 and trainer.test_ids() == test
    trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(RuntimeError, match=r"nnUNet_raw is not set.*set nnUNet_raw to the folder that holds "
                                           r"Dataset991_BraTSDemo"):
        trainer.get_tr_and_val_datasets()
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))  # a raw folder without this dataset
    with pytest.raises(FileNotFoundError, match="Dataset991_BraTSDemo does not exist"):
        trainer.get_tr_and_val_datasets()


@pytest.mark.parametrize("trainer_name", ["ssVAESegTrainer_3labels", "MeanTeacherTrainer_3labels"])
def test_unlabeled_trainers_refuse_imagesunlabeled_that_was_never_preprocessed(make_trainer, tiny_dataset, trainer_name,
                                                                            monkeypatch, tmp_path):
    """imagesUnlabeled exists but has no preprocessed copy for these plans: every trainer that learns from unlabeled
    images refuses and prints the command, instead of training on the fold's spare cases alone without a word."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    import nnunet_ext.trainers.semisupervised as semisupervised
    from nnunet_ext.data.pool import complete_cases, unlabeled_folder, unpreprocessed_unlabeled

    trainer = make_trainer(trainer_name)
    trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    folder = unlabeled_folder(trainer.preprocessed_dataset_folder_base, "nnUNetCPUPlans_3d_fullres")
    assert unpreprocessed_unlabeled(tiny_dataset["raw"], ".nii.gz", complete_cases(trainer.dataset_class, folder)) == []
    monkeypatch.setattr(semisupervised, "unlabeled_folder", lambda *args: str(tmp_path / "never_preprocessed"))
    with pytest.raises(ValueError, match=r"2 images of imagesUnlabeled have no preprocessed copy for plans "
                                         r"nnUNetCPUPlans, configuration 3d_fullres.*'nnunet-ext preprocess-unlabeled "
                                         r"-d Dataset991_BraTSDemo -c 3d_fullres -p nnUNetCPUPlans'"):
        trainer.get_tr_and_val_datasets()
