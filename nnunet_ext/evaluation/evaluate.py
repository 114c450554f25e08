"""Evaluate a folder of predicted label maps against ground truth: Dice and HD95 per case and region, and on
request lesion-wise Dice and HD95 (BraTS 2023), NSD and HD95 with area-weighted surface elements.

Follows ``nnUNetv2_evaluate_folder``: files are matched by name, the file ending comes from dataset.json,
and both folders hold label maps (predictions of region-trained models are already converted back to
label maps with ``regions_class_order``). Evaluated regions come from dataset.json ``labels``: every entry
except background and ``ignore``, named by its key; a list entry is a region (e.g. ``"tumor core": [2, 3]``),
an integer entry a single label. Region mask = ``np.isin(label_map, region_labels)``. Voxels that carry
the ignore label in the ground truth are removed from the prediction masks. See ``metrics`` for the Dice
and HD95 conventions and the empty-mask policies.

Checks before scoring (each failure is an error naming the file): files are complete and readable
(:mod:`nnunet_ext.images`), label values are integers listed in dataset.json ``labels``, and prediction
and reference lie on the same voxel grid (size, spacing, origin, direction within the tolerances of
:class:`nnunet_ext.images.Geometry`).

Outputs: a JSON summary (default ``PRED_FOLDER/summary_{policy}.json``; ``-o`` must end in .json) and a
per-case CSV beside it (same path with ``.csv``; one row per case and region: case, region, dice, hd95_mm,
n_ref, n_pred, then one column per requested extra metric). With ``lesionwise`` a per-lesion CSV goes beside
them (``summary_{policy}_lesions.csv``; one row per reference lesion and per false-positive component). The
command never replaces any of them without ``--overwrite``.
"""

import argparse
import csv
import json
import math
import multiprocessing
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.configuration import default_num_processes
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_ext.evaluation.lesions import BRATS_2023_GLIOMA, LesionwiseParameters, LesionwiseResult, lesionwise
from nnunet_ext.evaluation.metrics import (
    DICE_CONVENTION,
    EMPTY_POLICIES,
    EMPTY_POLICY_DESCRIPTIONS,
    HD95_CONVENTION,
    check_policy,
    dice,
    hd95,
    hd95_surfels,
    nsd,
)
from nnunet_ext.files import atomic_text, write_text_atomic
from nnunet_ext.images import Geometry, read_image

METRICS = ("Dice", "HD95")

EXTRA_METRICS = {  # --metrics name: the per-case values it adds, summarized like Dice and HD95
    "lesionwise": ("LesionDice", "LesionHD95"),
    "nsd": ("NSD",),
    "hd95-surfels": ("HD95_surfels",),
}

EXTRA_CSV_COLUMNS = {  # per-case CSV column: per-case value
    "lesionwise": {"lesion_dice": "LesionDice", "lesion_hd95_mm": "LesionHD95", "n_lesions": "n_lesions",
                   "n_false_positives": "n_false_positives"},
    "nsd": {"nsd": "NSD"},
    "hd95-surfels": {"hd95_surfels_mm": "HD95_surfels"},
}

LESION_CSV_COLUMNS = ("case", "region", "kind", "id", "voxels", "volume_mm3", "components", "dice", "hd95_mm")

SURFEL_CONVENTION = (
    "surface elements weighted by area, as DeepMind's surface-distance code (used by BraTS 2023 and MSD): one "
    "surfel per 2x2x2 cell of voxel centres on the mask boundary (image border outside), area of the cell's "
    "marching-cubes triangles with the spacing, distances between cell centres (exact Euclidean, mm)"
)

EXTRA_CONVENTIONS = {
    "lesionwise": "BraTS 2023 lesion-wise Dice and HD95 (mm): reference dilated {dilation_iterations} times "
    "(18-neighbour structure), lesions = reference voxels per 26-connected dilated component; every 26-connected "
    "predicted component touching a dilated lesion counts for it; per lesion Dice and HD95 (surfels) against the "
    "union of its components, a missed lesion scores 0 and {hd95_penalty_mm} mm; lesions of at most "
    "{max_ignored_volume_mm3} mm3 are ignored; every unmatched component is a false positive scoring 0 and "
    "{hd95_penalty_mm} mm; case score = sum / (scored lesions + false positives); none of either: the empty-mask "
    "policy (brats: 1 and 0)",
    "nsd": "normalized surface Dice at {nsd_tolerance_mm} mm: area of both surfaces within the tolerance of the "
    "other / area of both (surfels); empty masks as Dice",
    "hd95-surfels": "HD95 (mm) with surfels: per direction the smallest distance whose surfels hold 95 % of the "
    "area (no interpolation), the larger direction; empty masks as HD95",
}

STATISTICS_CONVENTION = (
    "mean, median and std (population, ddof=0) over cases, NaN values left out (n = number of non-NaN "
    "values); mean_excluding_both_empty leaves out the cases where reference and prediction are both empty "
    "(nnU-Net's convention); foreground_mean = mean over regions of the per-region means; "
    "NaN is written as null"
)


def regions_from_dataset_json(dataset_json: dict) -> dict[str, tuple[int, ...]]:
    """Return the evaluated regions ``{dataset.json key: labels}``: every entry but background and ignore."""
    LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))  # nnU-Net's own checks
    regions = {}
    for name, value in dataset_json["labels"].items():
        labels = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)
        if name != "ignore" and any(labels):
            regions[name] = labels
    if not regions:
        raise ValueError(f"dataset.json labels {dataset_json['labels']} define no foreground label or region")
    return regions


def read_label_map(path: Path, label_values: set[int]) -> tuple[np.ndarray, Geometry]:
    """Read a label map (array in z, y, x order) and its geometry; raise ValueError naming the file when it is
    damaged or holds values other than ``label_values``."""
    image = read_image(path)
    array = sitk.GetArrayFromImage(image)
    unknown = [v for v in np.unique(array) if v != round(float(v)) or round(float(v)) not in label_values]
    if unknown:
        shown = ", ".join(exact_value(v) for v in unknown[:10])
        fractional = " (label maps hold integers: round the prediction)" if any(v != round(float(v))
                                                                             for v in unknown) else ""
        raise ValueError(f"{path}: label values [{shown}] ({array.dtype}) are not labels of dataset.json "
                         f"({sorted(label_values)}){fractional}; fix the file or the dataset.json labels.")
    return array, Geometry.of(image)


def exact_value(value: np.generic) -> str:
    """A voxel value written exactly as its type holds it: 3 for an integral value, 2.9999998 for float32 3 - 2e-7."""
    if value == round(float(value)):
        return str(int(value))
    return np.format_float_positional(value, unique=True, trim="-")


def label_values(regions: dict[str, tuple[int, ...]], ignore_label: int | None) -> set[int]:
    """The values a label map may hold: background 0, the labels of every region, the ignore label."""
    return {0, *(v for labels in regions.values() for v in labels), *([] if ignore_label is None else [ignore_label])}


def read_pair(
    reference_file: Path, prediction_file: Path, values: set[int]
) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """Read a reference and its prediction; raise ValueError naming the file that is damaged, holds unknown
    labels, or lies on another voxel grid than the reference."""
    reference, geometry = read_label_map(reference_file, values)
    prediction, pred_geometry = read_label_map(prediction_file, values)
    differences = pred_geometry.differences(geometry)
    if differences:
        raise ValueError(
            f"{prediction_file}: {'; '.join(differences)} of the reference {reference_file} (x, y, z order); a "
            f"prediction must lie on its reference's voxel grid (nnUNetv2_predict writes the input's geometry)"
        )
    return reference, prediction, geometry


def check_extra_metrics(extra_metrics: Sequence[str]) -> None:
    """Raise ValueError for an unknown ``--metrics`` name."""
    unknown = [m for m in extra_metrics if m not in EXTRA_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(EXTRA_METRICS)}")


def lesion_rows(result: LesionwiseResult, hd95_penalty_mm: float) -> list[dict]:
    """One row per reference lesion (kind lesion, or ignored lesion) and per false-positive component."""
    rows = [
        {"kind": "lesion" if lesion.scored else "ignored lesion", "id": lesion.lesion_id, "voxels": lesion.voxels,
         "volume_mm3": lesion.volume_mm3, "components": list(lesion.components), "dice": lesion.dice,
         "hd95_mm": lesion.hd95}
        for lesion in result.lesions
    ]
    return rows + [
        {"kind": "false positive", "id": fp.component, "voxels": fp.voxels, "volume_mm3": fp.volume_mm3,
         "components": [fp.component], "dice": 0.0, "hd95_mm": hd95_penalty_mm}
        for fp in result.false_positives
    ]


def extra_case_metrics(
    ref_mask: np.ndarray,
    pred_mask: np.ndarray,
    spacing: tuple[float, ...],
    empty_policy: str,
    extra_metrics: Sequence[str],
    nsd_tolerance_mm: float,
    lesion_parameters: LesionwiseParameters,
) -> dict:
    """Return the requested extra metrics of one region: NSD, HD95_surfels, lesion-wise scores and lesions."""
    values: dict = {}
    if "nsd" in extra_metrics:
        values["NSD"] = nsd(pred_mask, ref_mask, spacing, nsd_tolerance_mm, empty_policy)
    if "hd95-surfels" in extra_metrics:
        values["HD95_surfels"] = hd95_surfels(pred_mask, ref_mask, spacing, empty_policy)
    if "lesionwise" in extra_metrics:
        result = lesionwise(pred_mask, ref_mask, spacing, lesion_parameters, empty_policy)
        values.update(
            LesionDice=result.dice, LesionHD95=result.hd95, n_lesions=sum(lesion.scored for lesion in result.lesions),
            n_false_positives=len(result.false_positives),
            lesions=lesion_rows(result, lesion_parameters.hd95_penalty_mm),
        )
    return values


def case_metrics(
    reference: np.ndarray,
    prediction: np.ndarray,
    regions: dict[str, tuple[int, ...]],
    spacing: tuple[float, ...],
    empty_policy: str = "brats",
    ignore_label: int | None = None,
    extra_metrics: Sequence[str] = (),
    nsd_tolerance_mm: float = 1.0,
    lesion_parameters: LesionwiseParameters = BRATS_2023_GLIOMA,
) -> dict[str, dict]:
    """Return ``{region: {Dice, HD95, n_ref, n_pred, extra metrics}}`` for one pair of label maps of one shape."""
    keep = reference != ignore_label if ignore_label is not None else np.ones(reference.shape, dtype=bool)
    results = {}
    for name, labels in regions.items():
        ref_mask = np.isin(reference, labels)
        pred_mask = np.isin(prediction, labels) & keep
        results[name] = {
            "Dice": dice(pred_mask, ref_mask, empty_policy),
            "HD95": hd95(pred_mask, ref_mask, spacing, empty_policy),
            "n_ref": int(ref_mask.sum()),
            "n_pred": int(pred_mask.sum()),
            **extra_case_metrics(ref_mask, pred_mask, spacing, empty_policy, extra_metrics, nsd_tolerance_mm,
                                 lesion_parameters),
        }
    return results


def evaluate_case(
    reference_file: Path,
    prediction_file: Path,
    regions: dict[str, tuple[int, ...]],
    empty_policy: str = "brats",
    ignore_label: int | None = None,
    extra_metrics: Sequence[str] = (),
    nsd_tolerance_mm: float = 1.0,
    lesion_parameters: LesionwiseParameters = BRATS_2023_GLIOMA,
) -> dict:
    """Read one reference/prediction pair and return its metrics with the case's files, shape and spacing."""
    reference, prediction, geometry = read_pair(
        reference_file, prediction_file, label_values(regions, ignore_label)
    )
    spacing = geometry.spacing[::-1]  # array axis order
    return {
        "reference_file": str(reference_file),
        "prediction_file": str(prediction_file),
        "shape": list(reference.shape),
        "spacing": [float(s) for s in spacing],
        "metrics": case_metrics(reference, prediction, regions, spacing, empty_policy, ignore_label, extra_metrics,
                                nsd_tolerance_mm, lesion_parameters),
    }


def _list_cases(folder: Path, file_ending: str) -> list[str]:
    """Return the sorted case ids of the files in ``folder`` that end with ``file_ending``."""
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist")
    return sorted(
        p.name[: -len(file_ending)]
        for p in folder.iterdir()
        if p.name.endswith(file_ending) and not p.name.startswith(".")
    )


def _match_cases(gt_folder: Path, pred_folder: Path, file_ending: str, chill: bool) -> list[str]:
    """Return the case ids to evaluate: every prediction, which must have a reference file."""
    predicted = _list_cases(pred_folder, file_ending)
    references = set(_list_cases(gt_folder, file_ending))
    if not predicted:
        raise FileNotFoundError(f"no predictions ending in {file_ending!r} in {pred_folder}")
    without_reference = [c for c in predicted if c not in references]
    if without_reference:
        raise FileNotFoundError(
            f"predictions without a reference file in {gt_folder}: {without_reference[:10]}"
        )
    not_predicted = sorted(references.difference(predicted))
    if not_predicted and not chill:
        raise FileNotFoundError(
            f"{len(not_predicted)} reference cases have no prediction in {pred_folder} (e.g. "
            f"{not_predicted[:10]}); pass --chill (chill=True) to evaluate only the predicted cases"
        )
    return predicted


def _statistics(values: list[float], both_empty: list[bool]) -> dict[str, float | int]:
    """Return mean, median, std, n (non-NaN), mean_excluding_both_empty and n_both_empty of one metric."""
    array = np.asarray(values, dtype=float)
    finite = array[~np.isnan(array)]
    kept = array[~np.asarray(both_empty) & ~np.isnan(array)]
    return {
        "mean": float(finite.mean()) if finite.size else math.nan,
        "median": float(np.median(finite)) if finite.size else math.nan,
        "std": float(finite.std()) if finite.size else math.nan,
        "n": int(finite.size),
        "mean_excluding_both_empty": float(kept.mean()) if kept.size else math.nan,
        "n_both_empty": int(np.sum(both_empty)),
    }


def summarized_metrics(extra_metrics: Sequence[str]) -> tuple[str, ...]:
    """The per-case values the summary holds statistics of: Dice, HD95, then those of each extra metric."""
    return METRICS + tuple(m for name in extra_metrics for m in EXTRA_METRICS[name])


def summarize(per_case: list[dict], regions: dict[str, tuple[int, ...]], extra_metrics: Sequence[str] = ()) -> dict:
    """Return ``{"summary": {region: {metric: statistics}}, "foreground_mean": {metric: value}}``."""
    metrics = summarized_metrics(extra_metrics)
    summary = {}
    for name in regions:
        cases = [c["metrics"][name] for c in per_case]
        both_empty = [c["n_ref"] == 0 and c["n_pred"] == 0 for c in cases]
        summary[name] = {m: _statistics([c[m] for c in cases], both_empty) for m in metrics}
    foreground_mean = {m: float(np.mean([summary[r][m]["mean"] for r in regions])) for m in metrics}
    return {"summary": summary, "foreground_mean": foreground_mean}


def _json_safe(value):
    """Return ``value`` with NaN floats replaced by None, recursively, so that the JSON is strict."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_per_case_csv(result: dict, path: Path) -> None:
    """Write one CSV row per case and region: case, region, dice, hd95_mm, n_ref, n_pred, extra metrics."""
    extra = {column: key for name in result["extra_metrics"] for column, key in EXTRA_CSV_COLUMNS[name].items()}
    with atomic_text(str(path)) as f:
        writer = csv.writer(f)
        writer.writerow(["case", "region", "dice", "hd95_mm", "n_ref", "n_pred", *extra])
        for case in result["metric_per_case"]:
            for region, m in case["metrics"].items():
                writer.writerow([case["case"], region, m["Dice"], m["HD95"], m["n_ref"], m["n_pred"],
                                 *(m[key] for key in extra.values())])


def write_lesion_csv(result: dict, path: Path) -> None:
    """Write one CSV row per case, region and lesion or false-positive component (:data:`LESION_CSV_COLUMNS`)."""
    with atomic_text(str(path)) as f:
        writer = csv.DictWriter(f, fieldnames=LESION_CSV_COLUMNS)
        writer.writeheader()
        for case in result["metric_per_case"]:
            for region, m in case["metrics"].items():
                for row in m["lesions"]:
                    components = " ".join(map(str, row["components"]))
                    writer.writerow({"case": case["case"], "region": region, **row, "components": components})


def load_dataset_json(dataset_json: str | Path | dict) -> dict:
    """Return dataset.json as a dict, given its path or the dict itself; check the keys evaluation needs."""
    where = "dataset.json" if isinstance(dataset_json, dict) else str(dataset_json)
    if isinstance(dataset_json, dict):
        content = dataset_json
    else:
        if not Path(dataset_json).is_file():
            raise FileNotFoundError(f"{dataset_json}: no such file (-djfile must name the dataset's dataset.json)")
        with open(dataset_json) as f:
            try:
                content = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"{dataset_json}: not valid JSON ({error})") from error
    for key, example in (("file_ending", '".nii.gz"'), ("labels", '{"background": 0, "tumour": 1}')):
        if key not in content:
            raise ValueError(f"{where} has no '{key}' entry (e.g. \"{key}\": {example}), which nnU-Net's "
                             f"dataset.json requires; add it.")
    return content


def lesion_csv_path(summary: Path) -> Path:
    """The per-lesion CSV beside a summary: ``summary_brats.json`` → ``summary_brats_lesions.csv``."""
    return summary.with_name(f"{summary.stem}_lesions.csv")


def output_paths(output_json: str | Path | None, pred_folder: Path, policy: str,
                 dataset_json: str | Path | dict, overwrite: bool, lesions: bool = False) -> tuple[Path, Path]:
    """(summary JSON, per-case CSV) paths; raise when ``-o`` does not end in .json (its CSV sibling would be the
    summary itself), names the dataset.json, or, unless ``overwrite``, when either file (or, with ``lesions``,
    the per-lesion CSV) exists."""
    summary = Path(output_json) if output_json is not None else pred_folder / f"summary_{policy}.json"
    if summary.suffix != ".json":
        raise ValueError(f"-o {summary}: the summary is JSON and the per-case CSV is written beside it with .csv, "
                         f"so -o must end in .json (e.g. -o {summary.with_suffix('.json')}).")
    if not isinstance(dataset_json, dict) and summary.resolve() == Path(dataset_json).resolve():
        raise ValueError(f"-o {summary} is the -djfile; choose another path for the summary.")
    per_case = summary.with_suffix(".csv")
    existing = [str(p) for p in (summary, per_case, *([lesion_csv_path(summary)] if lesions else [])) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{' and '.join(existing)} already exist: pass --overwrite to replace "
                              f"{'them' if len(existing) > 1 else 'it'}, or choose another -o.")
    return summary, per_case


def evaluate_folder(
    gt_folder: str | Path,
    pred_folder: str | Path,
    dataset_json: str | Path | dict,
    output_json: str | Path | None = None,
    policy: str = "brats",
    num_processes: int = 1,
    chill: bool = False,
    overwrite: bool = True,
    extra_metrics: Sequence[str] = (),
    nsd_tolerance_mm: float = 1.0,
    lesion_parameters: LesionwiseParameters = BRATS_2023_GLIOMA,
) -> dict:
    """Evaluate all predictions in ``pred_folder``; write JSON summary and per-case CSV; return the summary.

    ``output_json`` defaults to ``pred_folder/summary_{policy}.json`` and must end in .json; the CSV goes to
    the same path with ``.csv`` (:func:`output_paths`), and with ``lesionwise`` among ``extra_metrics`` the
    per-lesion CSV to :func:`lesion_csv_path`. Existing files are replaced only with ``overwrite`` (the default
    here, where the caller owns the folder; ``nnunet-ext evaluate`` needs ``--overwrite``). The returned dict is
    the JSON content, except that NaN stays NaN (the file has null).
    """
    check_policy(policy)
    check_extra_metrics(extra_metrics)
    extra_metrics = [m for m in EXTRA_METRICS if m in extra_metrics]
    lesions = "lesionwise" in extra_metrics
    gt_folder, pred_folder = Path(gt_folder), Path(pred_folder)
    output_json, output_csv = output_paths(output_json, pred_folder, policy, dataset_json, overwrite, lesions)
    dataset = load_dataset_json(dataset_json)
    file_ending = dataset["file_ending"]
    regions = regions_from_dataset_json(dataset)
    ignore_label = dataset["labels"].get("ignore")
    cases = _match_cases(gt_folder, pred_folder, file_ending, chill)
    jobs = [
        (gt_folder / f"{c}{file_ending}", pred_folder / f"{c}{file_ending}", regions, policy, ignore_label,
         extra_metrics, nsd_tolerance_mm, lesion_parameters)
        for c in cases
    ]
    if num_processes > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            per_case = pool.starmap(evaluate_case, jobs)
    else:
        per_case = [evaluate_case(*job) for job in jobs]
    result = {
        "conventions": {
            "empty_policy": policy,
            "empty_policy_description": EMPTY_POLICY_DESCRIPTIONS[policy],
            "dice": DICE_CONVENTION,
            "hd95": HD95_CONVENTION,
            "hd95_unit": "mm",
            "region_mask": "np.isin(label_map, region_labels); "
            "voxels with the ignore label in the reference are removed from the prediction",
            "statistics": STATISTICS_CONVENTION,
            **({"surfels": SURFEL_CONVENTION} if extra_metrics else {}),
            **{name: EXTRA_CONVENTIONS[name].format(nsd_tolerance_mm=nsd_tolerance_mm, **asdict(lesion_parameters))
               for name in extra_metrics},
        },
        "extra_metrics": extra_metrics,
        "gt_folder": str(gt_folder),
        "pred_folder": str(pred_folder),
        "dataset_json": None if isinstance(dataset_json, dict) else str(dataset_json),
        "file_ending": file_ending,
        "summary_json": str(output_json),
        "per_case_csv": str(output_csv),
        **({"per_lesion_csv": str(lesion_csv_path(output_json))} if lesions else {}),
        "regions": {name: list(labels) for name, labels in regions.items()},
        "num_cases": len(per_case),
        **summarize(per_case, regions, extra_metrics),
        "metric_per_case": [{"case": c, **r} for c, r in zip(cases, per_case, strict=True)],
    }
    output_json.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(str(output_json), json.dumps(_json_safe(result), indent=2, allow_nan=False))
    write_per_case_csv(result, output_csv)
    if lesions:
        write_lesion_csv(result, lesion_csv_path(output_json))
    return result


def format_summary(result: dict) -> str:
    """Return a small text table of the mean ± std of each region's metrics (Dice, HD95, then any extras)."""
    metrics = summarized_metrics(result.get("extra_metrics", ()))
    header = f"{'region':<24}"
    for m in metrics:
        header += f"{m + ' (mm) mean±std':>24}" if "HD95" in m else f"{m + ' mean±std':>20}"
    lines = [header]
    for name, stats in result["summary"].items():
        line = f"{name:<24}"
        for m in metrics:
            mean, std = stats[m]["mean"], stats[m]["std"]
            line += f"{mean:>15.2f} ± {std:<6.2f}" if "HD95" in m else f"{mean:>12.4f} ± {std:<6.4f}"
        lines.append(line)
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``nnunet-ext evaluate`` arguments (nnUNetv2_evaluate_folder conventions)."""
    parser.add_argument("gt_folder", help="folder with reference label maps")
    parser.add_argument("pred_folder", help="folder with predicted label maps (same file names)")
    parser.add_argument("-djfile", required=True, help="dataset.json (file ending, labels/regions)")
    parser.add_argument(
        "-o",
        default=None,
        help="output JSON (must end in .json); the per-case CSV goes to the same path with .csv. "
        "Default: PRED_FOLDER/summary_{policy}.json",
    )
    parser.add_argument(
        "-np",
        type=int,
        default=default_num_processes,
        help=f"number of processes. Default: {default_num_processes}",
    )
    parser.add_argument(
        "--empty-policy",
        choices=EMPTY_POLICIES,
        default="brats",
        help="empty-mask policy. brats: "
        + EMPTY_POLICY_DESCRIPTIONS["brats"]
        + ". nan: "
        + EMPTY_POLICY_DESCRIPTIONS["nan"]
        + ". Default: brats",
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        choices=tuple(EXTRA_METRICS),
        default=(),
        help="metrics beyond Dice and HD95: lesionwise (BraTS 2023 lesion-wise Dice and HD95, with a per-lesion CSV "
        "beside the summary), nsd (normalized surface Dice), hd95-surfels (HD95 with surface elements weighted "
        "by area, as the challenges compute it). Default: none",
    )
    parser.add_argument(
        "--nsd-tolerance", type=float, default=1.0, help="NSD tolerance in mm. Default: 1.0"
    )
    parser.add_argument(
        "--lesion-dilation",
        type=int,
        default=BRATS_2023_GLIOMA.dilation_iterations,
        help="lesion-wise: dilation iterations of the reference. Default: %(default)s (BraTS 2023 glioma)",
    )
    parser.add_argument(
        "--lesion-ignore-volume",
        type=float,
        default=BRATS_2023_GLIOMA.max_ignored_volume_mm3,
        help="lesion-wise: reference lesions of at most this volume (mm3) are ignored. Default: %(default)s",
    )
    parser.add_argument(
        "--lesion-hd95-penalty",
        type=float,
        default=BRATS_2023_GLIOMA.hd95_penalty_mm,
        help="lesion-wise: HD95 (mm) of a missed lesion or a false positive. Default: %(default)s",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing summary JSON and per-case CSV (refused by default)",
    )
    parser.add_argument(
        "--chill",
        action="store_true",
        help="do not fail if some reference cases have no prediction",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``nnunet-ext evaluate``: evaluate the folder, print the summary table, return 0."""
    parameters = LesionwiseParameters(args.lesion_dilation, args.lesion_ignore_volume, args.lesion_hd95_penalty)
    result = evaluate_folder(
        args.gt_folder, args.pred_folder, args.djfile, args.o, args.empty_policy, args.np, args.chill,
        args.overwrite, args.metrics, args.nsd_tolerance, parameters,
    )
    print(format_summary(result))
    per_lesion = f"; per lesion: {result['per_lesion_csv']}" if "per_lesion_csv" in result else ""
    print(
        f"{result['num_cases']} cases; summary: {result['summary_json']}; per case: {result['per_case_csv']}"
        f"{per_lesion}"
    )
    return 0
