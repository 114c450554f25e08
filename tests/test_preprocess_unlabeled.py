"""preprocess-unlabeled: equals nnU-Net's preprocessing, is idempotent and rejects bad input by file name."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.data.duplicates import ReferenceIndex, channel_contents, same_content
from nnunet_ext.data.pool import build_pool, complete_cases, load_manifest, unlabeled_folder
from nnunet_ext.data.preprocess_unlabeled import preprocess_unlabeled
from nnunet_ext.data.raw_cases import load_checked, raw_cases
from nnunet_ext.images import Geometry

UNLAB = "imagesUnlabeled"


def write(path, array, spacing=(1.0, 1.0, 1.0)):
    """Write an array as float32 image with the given spacing (SimpleITK order)."""
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
    write(folder / "C_0000.nii", ok)  # nnU-Net would skip it: refused, not left out of the count
    (folder / "notes.txt").write_text("not an image: ignored")
    with pytest.raises(ValueError, match=r"C_0000.nii: a .nii image in a dataset whose images end in .nii.gz "
                                         r"\(dataset.json file_ending\); nnU-Net .* skip it.*convert it to .nii.gz"):
        raw_cases(str(folder), ".nii.gz", 2)
    (folder / "C_0000.nii").unlink()
    assert list(raw_cases(str(folder), ".nii.gz", 2)) == ["A"]
    reader = SimpleITKIO()
    a0 = str(folder / "A_0000.nii.gz")
    write(tmp_path / "small.nii.gz", ok[:5])
    with pytest.raises(ValueError, match="small.nii.gz: size \\(8, 7, 5\\) vs \\(8, 7, 6\\) of .*A_0000.nii.gz"):
        load_checked([a0, str(tmp_path / "small.nii.gz")], reader)
    write(tmp_path / "coarse.nii.gz", ok, spacing=(1.0, 1.0, 3.0))
    with pytest.raises(ValueError, match="coarse.nii.gz: spacing \\(1, 1, 3\\) vs \\(1, 1, 1\\)"):
        load_checked([a0, str(tmp_path / "coarse.nii.gz")], reader)
    bad = ok.copy()
    bad[1, 2, 3] = np.nan
    write(tmp_path / "nan.mha", bad)
    with pytest.raises(ValueError, match="nan.mha: contains NaN or infinite"):
        load_checked([str(tmp_path / "nan.mha")], reader)
    nibabel.save(nibabel.Nifti1Image(bad.astype(np.float32), np.eye(4)), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(ValueError, match="nan.nii.gz: contains NaN or infinite"):  # SimpleITK reads it as 0
        load_checked([str(tmp_path / "nan.nii.gz")], reader)
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.nii.gz: truncated or damaged"):
        load_checked([str(tmp_path / "broken.nii.gz")], reader)
    case = load_checked([a0, str(folder / "A_0001.nii.gz")], reader)
    assert case.data.shape == (2, 6, 7, 8) and "spacing" in case.properties and not case.warnings


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".gipl"])
def test_truncated_image_is_refused_naming_the_file(tmp_path, ending):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    write(tmp_path / f"A_0000{ending}", np.random.rand(6, 7, 8) + 1)
    intact = (tmp_path / f"A_0000{ending}").read_bytes()
    (tmp_path / f"A_0000{ending}").write_bytes(intact[: len(intact) // 2])  # SimpleITK fills the rest with 0
    with pytest.raises(ValueError, match=f"A_0000{re.escape(ending)}: truncated"):
        load_checked([str(tmp_path / f"A_0000{ending}")], SimpleITKIO())


def test_other_dimensionality_and_misaligned_channels_are_refused(tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    write(tmp_path / "flat_0000.nii.gz", np.random.rand(7, 8), spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="flat_0000.nii.gz: a 2D image, but the dataset's images are 3D"):
        load_checked([str(tmp_path / "flat_0000.nii.gz")], SimpleITKIO(), dimension=3)
    image = np.random.rand(6, 7, 8)
    write(tmp_path / "A_0000.nii.gz", image)
    shifted = sitk.GetImageFromArray(image.astype(np.float32))
    shifted.SetOrigin((0.0, 0.0, 4.0))
    sitk.WriteImage(shifted, str(tmp_path / "A_0001.nii.gz"))
    files = [str(tmp_path / "A_0000.nii.gz"), str(tmp_path / "A_0001.nii.gz")]
    with pytest.raises(ValueError, match=r"A_0001.nii.gz: origin \(0, 0, 4\) vs \(0, 0, 0\) of .*A_0000.nii.gz; .*"
                                         r"--accept-misaligned-channels"):
        load_checked(files, SimpleITKIO(), dimension=3)
    accepted = load_checked(files, SimpleITKIO(), dimension=3, accept_misaligned=True)
    assert len(accepted.warnings) == 1 and "A_0001.nii.gz: origin (0, 0, 4)" in accepted.warnings[0]


def test_content_is_the_same_whatever_the_file_format(tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    image = sitk.GetImageFromArray((np.random.rand(6, 7, 8) * 100).astype(np.float32))
    image.SetSpacing((1.0, 1.5, 2.0))
    image.SetOrigin((3.0, -4.0, 5.0))
    sitk.WriteImage(image, str(tmp_path / "a.nii.gz"), True)
    (tmp_path / "b.nii.gz").write_bytes(gzip.compress(gzip.decompress((tmp_path / "a.nii.gz").read_bytes()), 1))
    sitk.WriteImage(image, str(tmp_path / "c.nii"), False)
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat64), str(tmp_path / "d.mha"), True)
    files = [str(tmp_path / n) for n in ("a.nii.gz", "b.nii.gz", "c.nii", "d.mha")]
    assert len({(tmp_path / n).read_bytes() for n in ("a.nii.gz", "b.nii.gz")}) == 2  # different bytes
    case = load_checked(files, SimpleITKIO(), accept_misaligned=True)
    contents = channel_contents(case.data, case.geometries)
    assert len({c["sha1"] for c in contents}) == 1 and all(same_content(contents[0], c) for c in contents)
    changed = sitk.GetArrayFromImage(image)
    changed[1, 2, 3] += 1
    moved = sitk.Image(image)
    moved.SetOrigin((3.0, -4.0, 6.0))
    other = channel_contents(np.stack([changed, sitk.GetArrayFromImage(moved)]),
                             [case.geometries[0], Geometry.of(moved)])
    index = ReferenceIndex({"imagesTs/T": contents[:1]}, {"T"})
    assert index.copies_of(contents[1:2]) == ["imagesTs/T"]
    assert index.copies_of(other[:1]) == []  # one voxel differs: another image
    blank = channel_contents(np.zeros((1, 6, 7, 8)), case.geometries[:1])
    assert not blank[0]["informative"]
    index = ReferenceIndex({"imagesTr/E": blank + contents[:1]}, {"E"})
    assert index.copies_of(blank + other[:1]) == []  # sharing an empty channel alone is no copy
    assert index.copies_of(blank + contents[1:2]) == ["imagesTr/E"]
    assert ReferenceIndex({"imagesTr/E": blank}, {"E"}).copies_of(blank) == ["imagesTr/E"]  # identical image


def test_voxels_decide_whatever_the_header_says_and_flips_or_transpositions_are_found(tmp_path):
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIOWithReorient

    image = (np.random.rand(5, 6, 7) * 100).astype(np.float32)
    plain = Geometry((7, 6, 5), (1.0,) * 3, (0.0,) * 3, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    reference = channel_contents(image[None], [plain])
    index = ReferenceIndex({"imagesTs/T": reference}, {"T"})
    moved = Geometry((7, 6, 5), (1.0,) * 3, (10.0,) * 3, (-1, 0, 0, 0, 1, 0, 0, 0, 1))
    edited = channel_contents(image[None], [moved])  # the same voxels, origin and direction edited
    assert index.copies_of(edited) == ["imagesTs/T"]
    assert index.evidence(edited, "imagesTs/T") == ("channel 0 = its channel 0; header differs: origin (10, 10, 10) "
                                                    "vs (0, 0, 0); direction (-1, 0, 0, 0, 1, 0, 0, 0, 1) vs "
                                                    "(1, 0, 0, 0, 1, 0, 0, 0, 1)")
    for turned in (image[::-1], image[:, ::-1, ::-1], image.transpose(2, 0, 1), image.transpose(1, 0, 2)[::-1]):
        contents = channel_contents(turned[None], [Geometry.of(sitk.GetImageFromArray(turned))])
        assert index.copies_of(contents) == ["imagesTs/T"]
        assert "flipped or transposed" in index.evidence(contents, "imagesTs/T")
    changed = image.transpose(2, 0, 1).copy()
    changed[0, 0, 0] += 1
    assert index.copies_of(channel_contents(changed[None], [moved])) == []

    # a reorienting reader returns an image with flipped direction cosines as a flipped array: still found
    flipped = sitk.GetImageFromArray(image)
    flipped.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(flipped, str(tmp_path / "flipped.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(image), str(tmp_path / "plain.nii.gz"))
    reader = NibabelIOWithReorient()
    read = [load_checked([str(tmp_path / f"{n}.nii.gz")], reader) for n in ("plain", "flipped")]
    assert not np.array_equal(read[0].data, read[1].data)
    contents = [channel_contents(case.data, case.geometries) for case in read]
    assert ReferenceIndex({"imagesTs/T": contents[0]}, {"T"}).copies_of(contents[1]) == ["imagesTs/T"]


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
    assert load_manifest(folder)["LEAKVAL"].copies == (f"imagesTr/{original}",)

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


@pytest.fixture
def tiny_copy(tiny_dataset, tmp_path, monkeypatch):
    """A private copy of the tiny dataset (raw and preprocessed) that the test may change."""
    name = os.path.basename(tiny_dataset["raw"])
    for var, source in (("nnUNet_raw", tiny_dataset["raw"]), ("nnUNet_preprocessed", tiny_dataset["preprocessed"])):
        shutil.copytree(source, tmp_path / var / name)
        monkeypatch.setenv(var, str(tmp_path / var))
    raw, preprocessed = tmp_path / "nnUNet_raw" / name, tmp_path / "nnUNet_preprocessed" / name
    shutil.rmtree(unlabeled_folder(str(preprocessed), "nnUNetCPUPlans_3d_fullres"))  # each test preprocesses it
    return {"id": tiny_dataset["id"], "raw": raw, "plans": "nnUNetCPUPlans",
            "folder": unlabeled_folder(str(preprocessed), "nnUNetCPUPlans_3d_fullres"),
            "train": sorted({f[:-12] for f in os.listdir(raw / "imagesTr")}),
            "test": sorted({f[:-12] for f in os.listdir(raw / "imagesTs")})}


def channel_files(raw, split: str, case: str) -> list:
    """The 4 channel files of a case."""
    return [raw / split / f"{case}_{c:04d}.nii.gz" for c in range(4)]


def complete_cases_of(ds) -> list[str]:
    """The complete cases of the preprocessed unlabeled folder, as the trainer finds them."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    return complete_cases(nnUNetDatasetBlosc2, ds["folder"]) if os.path.isdir(ds["folder"]) else []


def pool_of(ds, labeled=(), validation=()):
    """The pool the trainer would build from the preprocessed unlabeled folder (no training cases)."""
    return build_pool([], complete_cases_of(ds), list(labeled), list(validation), set(ds["test"]),
                      load_manifest(ds["folder"]))


@pytest.mark.slow
def test_copies_are_found_by_content_not_file_bytes(tiny_copy, monkeypatch):
    from nnunet_ext.data import duplicates

    ds = tiny_copy
    raw, test_a, test_b, train = ds["raw"], ds["test"][0], ds["test"][1], ds["train"][3]
    for c, (src, dst) in enumerate(zip(channel_files(raw, "imagesTs", test_a), channel_files(raw, UNLAB, "ZTS"))):
        dst.write_bytes(gzip.compress(gzip.decompress(src.read_bytes()), 1))  # re-gzipped: other bytes
        assert dst.read_bytes() != src.read_bytes(), c
    for src, dst in zip(channel_files(raw, "imagesTr", train), channel_files(raw, UNLAB, "ZTR")):
        sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(src)), sitk.sitkFloat64), str(dst))  # same values as float64
    swapped = channel_files(raw, "imagesTs", test_b)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    for src, dst in zip(swapped, channel_files(raw, UNLAB, "ZPERM")):  # channels in another order
        shutil.copy(src, dst)
    for src, dst in zip(channel_files(raw, "imagesTr", train), channel_files(raw, UNLAB, "ZNEW")):
        image = sitk.ReadImage(str(src))
        image[5, 6, 7] = image[5, 6, 7] + 1.0  # one voxel differs in every channel: a different image
        sitk.WriteImage(image, str(dst))
    preprocess_unlabeled(ds["id"], ["3d_fullres"], ds["plans"])
    copies = {case: check.copies for case, check in load_manifest(ds["folder"]).items()}
    unlabeled = sorted(c for c in copies if c.startswith("DEMO"))
    assert copies == {"ZTS": (f"imagesTs/{test_a}",), "ZTR": (f"imagesTr/{train}",),
                      "ZPERM": (f"imagesTs/{test_b}",), "ZNEW": (), **{c: () for c in unlabeled}}
    assert sorted(pool_of(ds).ids) == sorted(["ZTR", "ZNEW", *unlabeled])
    assert "labeled training case" in pool_of(ds, labeled=[train]).excluded["ZTR"]
    assert "validation case" in pool_of(ds, validation=[train]).excluded["ZTR"]

    read = []  # a rerun reads no imagesTr/imagesTs image again (cached by size and mtime) and redoes nothing
    monkeypatch.setattr(duplicates, "_read_contents", lambda *job: read.append(job))
    before = {f: os.path.getmtime(os.path.join(ds["folder"], f)) for f in os.listdir(ds["folder"])}
    preprocess_unlabeled(ds["id"], ["3d_fullres"], ds["plans"])
    assert read == [] and before == {f: os.path.getmtime(os.path.join(ds["folder"], f))
                                     for f in os.listdir(ds["folder"])}


@pytest.mark.slow
def test_copies_with_an_edited_header_are_kept_out_of_the_pool(tiny_copy):
    ds = tiny_copy
    raw, test = ds["raw"], ds["test"][0]
    for src, moved, flipped in zip(channel_files(raw, "imagesTs", test), channel_files(raw, UNLAB, "ZORIGIN"),
                                   channel_files(raw, UNLAB, "ZFLIP")):
        image = sitk.ReadImage(str(src))
        image.SetOrigin((10.0, 10.0, 10.0))
        sitk.WriteImage(image, str(moved))
        image = sitk.ReadImage(str(src))
        image.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        sitk.WriteImage(image, str(flipped))
    preprocess_unlabeled(ds["id"], ["3d_fullres"], ds["plans"])
    manifest = load_manifest(ds["folder"])
    assert manifest["ZORIGIN"].copies == manifest["ZFLIP"].copies == (f"imagesTs/{test}",)
    pool = pool_of(ds)  # the pool of the ss trainers, of MeanTeacher and of the pseudo-label teacher
    assert "ZORIGIN" not in pool.ids and "ZFLIP" not in pool.ids
    assert pool.excluded["ZFLIP"].startswith(f"imagesUnlabeled image is a copy of imagesTs/{test}")
    with open(os.path.join(ds["folder"], "manifest", "ZFLIP.json")) as f:
        assert "header differs: direction (-1, 0, 0" in json.load(f)["copy_evidence"][f"imagesTs/{test}"]


@pytest.mark.slow
def test_interrupted_run_never_leaves_a_case_without_its_duplicate_check(tiny_copy, monkeypatch):
    ds = tiny_copy
    for src, dst in zip(channel_files(ds["raw"], "imagesTs", ds["test"][0]), channel_files(ds["raw"], UNLAB, "ZTS")):
        shutil.copy(src, dst)  # a byte copy of a test image, as users make them

    class Interrupted(BaseException):
        """Stands for the kill of the process."""

    replace, interrupt_at, completed, interrupted = os.replace, 1, False, []
    while not completed:  # interrupt each run at a later file move than the one before, until a run completes
        moves = []

        def interrupted_replace(src, dst, at=interrupt_at, moves=moves):
            moves.append(dst)
            if len(moves) == at:
                raise Interrupted(dst)
            replace(src, dst)

        monkeypatch.setattr(os, "replace", interrupted_replace)
        try:
            preprocess_unlabeled(ds["id"], ["3d_fullres"], ds["plans"])
            completed = True
        except Interrupted as stop:
            interrupted.append(os.path.basename(str(stop)))
        monkeypatch.setattr(os, "replace", replace)
        pool = pool_of(ds)  # what a trainer would use now: never the copy, never a case without a check
        assert "ZTS" not in pool.ids
        assert set(complete_cases_of(ds)) <= set(load_manifest(ds["folder"]))
        interrupt_at += 1
    assert pool.excluded["ZTS"].startswith(f"imagesUnlabeled image is a copy of imagesTs/{ds['test'][0]}")
    assert any(name.startswith("ZTS") for name in interrupted)  # also while the copy itself was being written


@pytest.mark.slow
def test_checks_follow_changes_of_the_test_split_and_of_the_raw_images(tiny_copy):
    ds = tiny_copy
    raw = ds["raw"]
    preprocess_unlabeled(ds["id"], ["3d_fullres"], ds["plans"])
    unlabeled = sorted(load_manifest(ds["folder"]))
    data_files = {f: os.path.getmtime(os.path.join(ds["folder"], f)) for f in os.listdir(ds["folder"])
                  if f.endswith((".b2nd", ".pkl"))}
    # a new test case that an unlabeled image copies: trainers refuse the old checks until a rerun
    for src, dst in zip(channel_files(raw, UNLAB, unlabeled[0]), channel_files(raw, "imagesTs", "DEMO_099")):
        shutil.copy(src, dst)
    shutil.copy(raw / "labelsTs" / f"{ds['test'][0]}.nii.gz", raw / "labelsTs" / "DEMO_099.nii.gz")
    ds["test"].append("DEMO_099")
    with pytest.raises(ValueError, match=r"checked for copies before the cases \['DEMO_099'\] existed"):
        pool_of(ds)
    preprocess_unlabeled(ds["id"], ["3d_fullres"], ds["plans"])
    assert load_manifest(ds["folder"])[unlabeled[0]].copies == ("imagesTs/DEMO_099",)
    assert unlabeled[0] in pool_of(ds).excluded
    assert data_files == {f: os.path.getmtime(os.path.join(ds["folder"], f)) for f in data_files}  # not redone

    # a raw image replaced after preprocessing: the case is preprocessed and checked again
    for src, dst in zip(channel_files(raw, "imagesTs", ds["test"][0]), channel_files(raw, UNLAB, unlabeled[1])):
        shutil.copyfile(src, dst)
    preprocess_unlabeled(ds["id"], ["3d_fullres"], ds["plans"])
    assert load_manifest(ds["folder"])[unlabeled[1]].copies == (f"imagesTs/{ds['test'][0]}",)
    assert os.path.getmtime(os.path.join(ds["folder"], unlabeled[1] + ".pkl")) > data_files[unlabeled[1] + ".pkl"]

    # a 2D image in this 3D dataset is refused before anything is written
    for c in range(4):
        write(raw / UNLAB / f"FLAT_{c:04d}.nii.gz", np.random.rand(32, 32), spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="FLAT_0000.nii.gz: a 2D image, but the dataset's images are 3D"):
        preprocess_unlabeled(ds["id"], ["3d_fullres"], ds["plans"])
    assert not any(f.startswith("FLAT") for f in os.listdir(ds["folder"]))
