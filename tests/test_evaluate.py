"""Folder evaluation: regions from dataset.json, spacing order, summaries, files and the CLI hooks."""

import argparse
import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.evaluation import evaluate
from nnunet_ext.evaluation.metrics import image_diagonal_mm

SHAPE = (6, 7, 8)  # array order (z, y, x)
SITK_SPACING = (1.0, 2.0, 3.0)  # SimpleITK order (x, y, z): array spacing is (3, 2, 1)
ARRAY_SPACING = SITK_SPACING[::-1]

BRATS_JSON = {
    "channel_names": {"0": "FLAIR"},
    "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
    "regions_class_order": [1, 2, 3],
    "numTraining": 3,
    "file_ending": ".nii.gz",
}


def _write(array: np.ndarray, path) -> None:
    """Write a uint8 label map with the test spacing."""
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(SITK_SPACING)
    sitk.WriteImage(image, str(path))


def _tumour() -> np.ndarray:
    """A label map with edema (1) around necrosis (2) around enhancing tumour (3)."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[1:5, 1:6, 1:7] = 1
    labels[2:4, 2:5, 2:6] = 2
    labels[2:4, 3, 3:5] = 3
    return labels


@pytest.fixture
def folders(tmp_path):
    """GT and prediction folders with three cases: perfect, ET missed and WT shifted, no ET anywhere."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    tumour = _tumour()
    missed_et = np.roll(np.where(tumour == 3, 2, tumour), 1, axis=0)  # shift 1 voxel along z (3 mm)
    no_et = np.where(tumour == 3, 2, tumour)
    for case, (ref, prediction) in {
        "case_a": (tumour, tumour),
        "case_b": (tumour, missed_et),
        "case_c": (no_et, no_et),
    }.items():
        _write(ref, gt / f"{case}.nii.gz")
        _write(prediction, pred / f"{case}.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps(BRATS_JSON))
    return gt, pred, tmp_path / "dataset.json"


def test_regions_from_dataset_json():
    assert evaluate.regions_from_dataset_json(BRATS_JSON) == {
        "whole tumor": (1, 2, 3),
        "tumor core": (2, 3),
        "enhancing tumor": (3,),
    }
    plain = {"labels": {"background": 0, "liver": 1, "tumour": 2, "ignore": 3}}
    assert evaluate.regions_from_dataset_json(plain) == {"liver": (1,), "tumour": (2,)}


def test_case_metrics_uses_array_axis_spacing(folders):
    gt, pred, _ = folders
    result = evaluate.evaluate_case(
        gt / "case_b.nii.gz", pred / "case_b.nii.gz", evaluate.regions_from_dataset_json(BRATS_JSON)
    )
    assert result["spacing"] == list(ARRAY_SPACING)
    metrics = result["metrics"]
    assert metrics["whole tumor"]["HD95"] == pytest.approx(3.0)  # shifted by one voxel along z (3 mm)
    assert metrics["enhancing tumor"]["Dice"] == 0.0
    assert metrics["enhancing tumor"]["HD95"] == pytest.approx(image_diagonal_mm(SHAPE, ARRAY_SPACING))
    assert metrics["enhancing tumor"]["n_pred"] == 0


def test_evaluate_folder_brats_policy(folders):
    gt, pred, dataset_json = folders
    result = evaluate.evaluate_folder(gt, pred, dataset_json)
    assert result["num_cases"] == 3
    assert result["conventions"]["empty_policy"] == "brats"
    et = result["summary"]["enhancing tumor"]
    diagonal = image_diagonal_mm(SHAPE, ARRAY_SPACING)
    np.testing.assert_allclose([et["Dice"]["mean"], et["Dice"]["median"]], [2 / 3, 1.0])
    assert et["Dice"]["std"] == pytest.approx(np.std([1.0, 0.0, 1.0]))
    assert et["Dice"]["mean_excluding_both_empty"] == pytest.approx(0.5)
    assert et["Dice"]["n_both_empty"] == 1
    assert et["HD95"]["mean"] == pytest.approx(diagonal / 3)
    assert et["HD95"]["mean_excluding_both_empty"] == pytest.approx(diagonal / 2)
    assert result["summary"]["whole tumor"]["Dice"]["mean_excluding_both_empty"] == pytest.approx(
        result["summary"]["whole tumor"]["Dice"]["mean"]
    )
    saved = json.loads((pred / "summary_brats.json").read_text())
    assert saved["summary"] == result["summary"]
    assert [c["case"] for c in saved["metric_per_case"]] == ["case_a", "case_b", "case_c"]
    with open(pred / "summary_brats.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9
    row = next(r for r in rows if r["case"] == "case_b" and r["region"] == "enhancing tumor")
    assert float(row["dice"]) == 0.0 and float(row["hd95_mm"]) == pytest.approx(diagonal)


def test_evaluate_folder_nan_policy_writes_strict_json(folders, tmp_path):
    gt, pred, dataset_json = folders
    out = tmp_path / "out" / "nan.json"
    result = evaluate.evaluate_folder(gt, pred, dataset_json, output_json=out, policy="nan")
    et = result["summary"]["enhancing tumor"]
    assert et["Dice"]["mean"] == pytest.approx(0.5) and et["Dice"]["n"] == 2
    assert et["HD95"]["mean"] == 0.0 and et["HD95"]["n"] == 1
    saved = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert saved["conventions"]["empty_policy"] == "nan"
    assert saved["metric_per_case"][2]["metrics"]["enhancing tumor"]["Dice"] is None
    assert math.isnan(result["metric_per_case"][2]["metrics"]["enhancing tumor"]["Dice"])
    assert out.with_suffix(".csv").is_file()


def test_ignore_label_voxels_are_not_counted(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    ref = np.zeros(SHAPE, dtype=np.uint8)
    ref[1:3, 1:3, 1:3] = 1
    ref[4:, 4:, 4:] = 2
    _write(ref, gt / "c.nii.gz")
    _write(np.where(ref > 0, 1, 0), pred / "c.nii.gz")
    dataset = {"labels": {"background": 0, "organ": 1, "ignore": 2}, "file_ending": ".nii.gz"}
    result = evaluate.evaluate_folder(gt, pred, dataset)
    assert result["metric_per_case"][0]["metrics"]["organ"]["Dice"] == 1.0
    assert result["dataset_json"] is None


def test_evaluate_folder_with_two_processes_matches_serial(folders, tmp_path):
    gt, pred, dataset_json = folders
    serial = evaluate.evaluate_folder(gt, pred, dataset_json, output_json=tmp_path / "s.json")
    parallel = evaluate.evaluate_folder(
        gt, pred, dataset_json, output_json=tmp_path / "p.json", num_processes=2
    )
    assert parallel["metric_per_case"] == serial["metric_per_case"]


def test_missing_files_and_mismatches_are_reported(folders):
    gt, pred, dataset_json = folders
    (pred / "case_c.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="case_c.*--chill"):
        evaluate.evaluate_folder(gt, pred, dataset_json)
    assert evaluate.evaluate_folder(gt, pred, dataset_json, chill=True)["num_cases"] == 2
    _write(np.zeros((2, 2, 2)), pred / "extra.nii.gz")
    with pytest.raises(FileNotFoundError, match="extra"):
        evaluate.evaluate_folder(gt, pred, dataset_json, chill=True)
    _write(np.zeros((2, 2, 2)), gt / "extra.nii.gz")
    _write(np.zeros((2, 2, 3)), pred / "extra.nii.gz")
    with pytest.raises(ValueError, match=r"pred/extra.nii.gz: size \(3, 2, 2\) vs \(2, 2, 2\) of the reference"):
        evaluate.evaluate_folder(gt, pred, dataset_json, chill=True)
    with pytest.raises(ValueError, match="policy"):
        evaluate.evaluate_folder(gt, pred, dataset_json, policy="zero")


def test_truncated_prediction_or_reference_is_refused(folders):
    gt, pred, dataset_json = folders
    for folder in (pred, gt):  # SimpleITK reads the missing voxels as 0 and the case would be scored
        path = folder / "case_a.nii.gz"
        intact = path.read_bytes()
        path.write_bytes(intact[: len(intact) // 2])
        with pytest.raises(ValueError, match=f"{folder.name}/case_a.nii.gz: truncated or damaged file"):
            evaluate.evaluate_folder(gt, pred, dataset_json)
        path.write_bytes(intact)
    (pred / "case_a.nii.gz").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="pred/case_a.nii.gz: truncated or damaged"):
        evaluate.evaluate_folder(gt, pred, dataset_json)


@pytest.mark.parametrize("value, dtype, shown", [(5, np.uint8, "5"), (7, np.uint8, "7"), (-3, np.int8, "-3"),
                                                 (1.4, np.float32, "1.4"), (3 - 2e-7, np.float32, "2.9999998")])
def test_label_values_outside_dataset_json_are_refused(folders, value, dtype, shown):
    gt, pred, dataset_json = folders
    for folder in (pred, gt):
        labels = _tumour().astype(dtype)
        labels[0, 0, 0] = value
        image = sitk.GetImageFromArray(labels)
        image.SetSpacing(SITK_SPACING)
        original = (folder / "case_b.nii.gz").read_bytes()
        sitk.WriteImage(image, str(folder / "case_b.nii.gz"))
        dtype_name = np.dtype(dtype).name
        with pytest.raises(ValueError, match=rf"{folder.name}/case_b.nii.gz: label values \[{shown}\] \({dtype_name}\) "
                                             rf"are not labels of dataset.json \(\[0, 1, 2, 3\]\)"):
            evaluate.evaluate_folder(gt, pred, dataset_json)
        (folder / "case_b.nii.gz").write_bytes(original)


@pytest.mark.parametrize("change, field", [
    (lambda image: image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1)), "direction"),  # flipped along x
    (lambda image: image.SetOrigin((0.0, 0.0, 1.0)), "origin"),  # shifted by one voxel along z
    (lambda image: image.SetSpacing((1.0, 2.0, 3.1)), "spacing"),
])
def test_prediction_on_another_voxel_grid_is_refused(folders, change, field):
    gt, pred, dataset_json = folders
    image = sitk.ReadImage(str(gt / "case_a.nii.gz"))  # the reference itself: Dice 1 if the grid were ignored
    change(image)
    sitk.WriteImage(image, str(pred / "case_a.nii.gz"))
    with pytest.raises(ValueError, match=f"pred/case_a.nii.gz: {field} .* of the reference .*gt/case_a.nii.gz"):
        evaluate.evaluate_folder(gt, pred, dataset_json)


def test_output_that_would_collide_or_overwrite_is_refused(folders, tmp_path):
    gt, pred, dataset_json = folders
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"-o .*same.csv: .*-o must end in .json \(e.g. -o .*same.json\)"):
        evaluate.evaluate_folder(gt, pred, dataset_json, out / "same.csv", overwrite=False)
    with pytest.raises(ValueError, match="is the -djfile"):
        evaluate.evaluate_folder(gt, pred, dataset_json, dataset_json)
    assert not out.exists()
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    cli = [str(gt), str(pred), "-djfile", str(dataset_json), "-np", "1", "-o", str(out / "summary.json")]
    assert evaluate.run(parser.parse_args(cli)) == 0
    written = {p: p.read_bytes() for p in (out / "summary.json", out / "summary.csv")}
    for existing in ((out / "summary.json", out / "summary.csv"), (out / "summary.csv",)):
        (out / "summary.json").unlink()
        for p in existing:
            p.write_bytes(written[p])
        with pytest.raises(FileExistsError, match=f"{existing[-1]} already exist.*--overwrite"):
            evaluate.run(parser.parse_args(cli))
    assert (out / "summary.csv").read_bytes() == written[out / "summary.csv"]  # kept
    assert evaluate.run(parser.parse_args([*cli, "--overwrite"])) == 0
    assert (out / "summary.json").is_file()


def test_dataset_json_without_file_ending_or_labels_is_refused(folders, tmp_path):
    gt, pred, _ = folders
    for key in ("file_ending", "labels"):
        content = {k: v for k, v in BRATS_JSON.items() if k != key}
        (tmp_path / "incomplete.json").write_text(json.dumps(content))
        with pytest.raises(ValueError, match=f"incomplete.json has no '{key}' entry"):
            evaluate.evaluate_folder(gt, pred, tmp_path / "incomplete.json")
    with pytest.raises(FileNotFoundError, match="missing.json: no such file"):
        evaluate.evaluate_folder(gt, pred, tmp_path / "missing.json")


def test_cli_hooks(folders, tmp_path, capsys):
    gt, pred, dataset_json = folders
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    out = tmp_path / "cli" / "summary.json"
    args = parser.parse_args(
        [
            str(gt),
            str(pred),
            "-djfile",
            str(dataset_json),
            "-o",
            str(out),
            "-np",
            "1",
            "--empty-policy",
            "nan",
        ]
    )
    assert evaluate.run(args) == 0
    assert json.loads(out.read_text())["conventions"]["empty_policy"] == "nan"
    assert (tmp_path / "cli" / "summary.csv").is_file()
    assert "enhancing tumor" in capsys.readouterr().out
    defaults = parser.parse_args([str(gt), str(pred), "-djfile", str(dataset_json)])
    assert defaults.empty_policy == "brats" and defaults.o is None and not defaults.chill


@pytest.mark.parametrize("policy", ["brats", "nan"])
def test_summary_case_results_and_the_demo_table_read_the_summary_as_written(folders, tmp_path, policy):
    from nnunet_ext.demo import results_table
    from nnunet_ext.evaluation.report import summary_case_results

    gt, pred, dataset_json = folders
    evaluate.evaluate_folder(gt, pred, dataset_json, tmp_path / "summary.json", policy=policy)
    summary = json.loads((tmp_path / "summary.json").read_text())  # as the study reads it: NaN written as null
    cases = summary_case_results(summary, "EncDecTrainer_6labels", "EncDec", 6, None, (0, 1))
    assert len(cases) == 9 and {c.policy for c in cases} == {policy}
    et = {c.case: c for c in cases if c.region == "enhancing tumor"}
    assert et["case_b"].dice == 0.0 and et["case_b"].folds == (0, 1)
    assert et["case_c"].dice == (1.0 if policy == "brats" else pytest.approx(math.nan, nan_ok=True))
    table = results_table({"ssCPCSegTrainer_6labels_10unlabeled": summary}).splitlines()
    assert table[0].startswith("| model | labels | unlabeled | Dice ET | Dice TC | Dice WT |")
    et_mean = "0.6667" if policy == "brats" else "0.5000"  # case_c has no ET: 1 (BraTS) or left out (nnU-Net)
    assert table[2].startswith(f"| ssCPCSeg | 6 | 10 | {et_mean} | ")


def _cube_area(edge: int) -> float:
    """Marching-cubes surface area of a cube of ``edge`` voxels at 1 mm: faces, bevelled edges, corner triangles."""
    return 6 * (edge - 1) ** 2 + 6 * math.sqrt(2) * (edge - 1) + math.sqrt(3)


@pytest.fixture
def lesion_folders(tmp_path):
    """One case at 1 mm: reference lesions A and B (4³ voxels), prediction A and a far 3³ false positive."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    ref = np.zeros((30, 30, 30), dtype=np.uint8)
    ref[2:6, 2:6, 2:6] = ref[20:24, 20:24, 20:24] = 1
    prediction = np.zeros_like(ref)
    prediction[2:6, 2:6, 2:6] = prediction[12:15, 2:5, 20:23] = 1
    for array, folder in ((ref, gt), (prediction, pred)):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / "case.nii.gz"))
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "tumour": 1},
                                                       "file_ending": ".nii.gz"}))
    return gt, pred, tmp_path / "dataset.json"


def test_lesionwise_and_nsd_in_the_summary_and_csvs(lesion_folders, tmp_path):
    gt, pred, dataset_json = lesion_folders
    out = tmp_path / "out" / "summary.json"
    result = evaluate.evaluate_folder(gt, pred, dataset_json, out, extra_metrics=["nsd", "lesionwise"])
    assert result["extra_metrics"] == ["lesionwise", "nsd"]
    m = result["metric_per_case"][0]["metrics"]["tumour"]
    assert m["LesionDice"] == pytest.approx(1 / 3)  # lesion A 1, lesion B missed 0, one false positive 0
    assert m["LesionHD95"] == pytest.approx(2 * 374 / 3)
    assert (m["n_lesions"], m["n_false_positives"]) == (2, 1)
    # A's surfaces coincide; B's and the false positive's lie farther than 1 mm from the other mask
    assert m["NSD"] == pytest.approx(2 * _cube_area(4) / (3 * _cube_area(4) + _cube_area(3)))
    assert result["summary"]["tumour"]["LesionDice"]["mean"] == pytest.approx(1 / 3)
    assert result["foreground_mean"]["NSD"] == pytest.approx(m["NSD"])
    assert "lesion-wise" in result["conventions"]["lesionwise"] and "374.0 mm" in result["conventions"]["lesionwise"]
    with open(out.with_suffix(".csv")) as f:
        row = next(csv.DictReader(f))
    assert float(row["lesion_dice"]) == pytest.approx(1 / 3) and float(row["nsd"]) == pytest.approx(m["NSD"])
    with open(tmp_path / "out" / "summary_lesions.csv") as f:
        lesions = [(r["kind"], r["id"], r["voxels"], r["components"], float(r["dice"]), float(r["hd95_mm"]))
                   for r in csv.DictReader(f)]
    assert lesions == [("lesion", "1", "64", "1", 1.0, 0.0), ("lesion", "2", "64", "", 0.0, 374.0),
                       ("false positive", "2", "27", "2", 0.0, 374.0)]
    saved = json.loads(out.read_text())
    assert saved["metric_per_case"][0]["metrics"]["tumour"]["lesions"][2]["voxels"] == 27
    from nnunet_ext.evaluation.report import summary_case_results

    (case,) = summary_case_results(saved, "EncDecTrainer_6labels", "EncDec", 6, None, (0,))
    assert case.lesion_dice == pytest.approx(1 / 3) and case.nsd == pytest.approx(m["NSD"])
    assert math.isnan(case.hd95_surfels)  # not asked for


def test_default_evaluation_is_unchanged_and_the_cli_takes_lesion_parameters(lesion_folders, tmp_path, capsys):
    gt, pred, dataset_json = lesion_folders
    plain = evaluate.evaluate_folder(gt, pred, dataset_json, tmp_path / "plain.json")
    assert set(plain["metric_per_case"][0]["metrics"]["tumour"]) == {"Dice", "HD95", "n_ref", "n_pred"}
    assert not (tmp_path / "plain_lesions.csv").exists() and "per_lesion_csv" not in plain
    assert (tmp_path / "plain.csv").read_text().splitlines()[0] == "case,region,dice,hd95_mm,n_ref,n_pred"
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    cli = [str(gt), str(pred), "-djfile", str(dataset_json), "-np", "1", "-o", str(tmp_path / "brats24.json"),
           "--metrics", "lesionwise", "hd95-surfels", "--lesion-hd95-penalty", "337", "--lesion-ignore-volume", "64"]
    assert evaluate.run(parser.parse_args(cli)) == 0
    assert "LesionHD95 (mm) mean±std" in capsys.readouterr().out
    m = json.loads((tmp_path / "brats24.json").read_text())["metric_per_case"][0]["metrics"]["tumour"]
    assert (m["LesionDice"], m["LesionHD95"]) == (0.0, 337.0)  # both 64-voxel lesions ignored: only the FP counts
    assert m["HD95_surfels"] > 0
    with pytest.raises(FileExistsError, match="brats24_lesions.csv"):
        (tmp_path / "brats24.json").unlink()
        (tmp_path / "brats24.csv").unlink()
        evaluate.run(parser.parse_args(cli))
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate.evaluate_folder(gt, pred, dataset_json, tmp_path / "x.json", extra_metrics=["hd99"])
