"""Convert MSD Task01_BrainTumour into an nnU-Net v2 raw dataset with a labeled held-out test split.

Input: the MSD folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``); images are 4D NIfTI
of size (x, y, z, channel). Output: ``$nnUNet_raw/Dataset{ID:03d}_BrainTumour`` with

- ``imagesTr/``, ``labelsTr/``: training cases, one 3D file per channel (``BRATS_001_0000.nii.gz`` …) with
  the 4D image's spatial geometry (spacing, origin and the 3×3 block of the 4×4 direction);
  labels as uint8 with MSD's values unchanged (0 background, 1 edema, 2 non-enhancing tumour,
  3 enhancing tumour);
- ``imagesTs/``, ``labelsTs/``: the labeled held-out test cases, carved from MSD's imagesTr;
- ``imagesUnlabeled/``: MSD's unlabeled imagesTs, same channel naming;
- ``dataset.json``: regions whole tumor {1,2,3}, tumor core {2,3}, enhancing tumor {3};
- ``split.json``: which case went where, and how the test split was chosen.

The dataset is written into a staging folder next to the target (``.Dataset{ID:03d}_BrainTumour.partial``)
and moved into place only when complete, so a conversion that fails half-way leaves no partial dataset
that nnU-Net could read, and an existing dataset replaced with ``--overwrite`` stays until then. Every
image and label is checked before use (truncated or damaged files name themselves, see
:mod:`nnunet_ext.images`).
"""

import argparse
import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.configuration import default_num_processes
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

from nnunet_ext.images import read_image

DATASET_NAME = "BrainTumour"
FILE_ENDING = ".nii.gz"
MSD_LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumor"}
REGIONS = {"background": 0, "whole tumor": (1, 2, 3), "tumor core": (2, 3), "enhancing tumor": (3,)}
REGIONS_CLASS_ORDER = (1, 2, 3)
PROGRESS_EVERY = 10
PAPER = "paper"  # --test-ids value: the paper's split shipped with nnunet_ext


def _normalized_label_names(labels: dict) -> dict[str, str]:
    """Return MSD label names lower-cased, with British 'tumour' spelled 'tumor'."""
    return {str(k): str(v).strip().lower().replace("tumour", "tumor") for k, v in labels.items()}


def load_msd_dataset_json(msd_folder: Path) -> dict:
    """Read and check the MSD dataset.json: Task01 labels, channel names in ``modality``, case lists."""
    path = msd_folder / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: -i must point at the MSD Task01_BrainTumour folder")
    with open(path) as f:
        msd = json.load(f)
    missing = [k for k in ("modality", "labels", "training") if k not in msd]
    if missing:
        raise ValueError(f"{path} lacks the keys {missing} of an MSD dataset.json")
    if _normalized_label_names(msd["labels"]) != MSD_LABELS:
        raise ValueError(
            f"{path} declares labels {msd['labels']}, not MSD Task01's {MSD_LABELS}; the WT/TC/ET regions "
            "written by this converter would be wrong for this dataset"
        )
    if sorted(int(k) for k in msd["modality"]) != list(range(len(msd["modality"]))):
        raise ValueError(f"{path}: modality keys {list(msd['modality'])} are not 0..C-1")
    return msd


def _case_id(relative_path: str) -> str:
    """Return the case id of an MSD path such as ``./imagesTr/BRATS_457.nii.gz`` (``BRATS_457``)."""
    name = Path(relative_path).name
    if not name.endswith(FILE_ENDING):
        raise ValueError(f"MSD file {relative_path} does not end with {FILE_ENDING}")
    return name[: -len(FILE_ENDING)]


def _existing(path: Path, what: str) -> Path:
    """Return ``path`` if the file exists, else raise FileNotFoundError naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} is listed in the MSD dataset.json but missing")
    return path


def msd_cases(msd_folder: Path, msd: dict) -> tuple[dict[str, tuple[Path, Path]], dict[str, Path]]:
    """Return ``({id: (image, label)}, {id: unlabeled image})`` from the MSD dataset.json; check the files."""
    labeled = {}
    for entry in msd["training"]:
        image = _existing(msd_folder / entry["image"], "image")
        if "label" not in entry:
            raise ValueError(f"training image {image} has no label entry in {msd_folder / 'dataset.json'}")
        labeled[_case_id(entry["image"])] = (image, _existing(msd_folder / entry["label"], "label"))
    listed = {image.name for image, _ in labeled.values()}
    unlisted = sorted(
        p.name
        for p in (msd_folder / "imagesTr").glob(f"*{FILE_ENDING}")
        if not p.name.startswith(".") and p.name not in listed
    )
    if unlisted:
        raise ValueError(
            f"images in {msd_folder / 'imagesTr'} without a training entry (label): {unlisted[:10]}"
        )
    unlabeled = {_case_id(p): _existing(msd_folder / p, "unlabeled image") for p in msd.get("test", [])}
    return labeled, unlabeled


def load_test_ids(path: Path) -> list[str]:
    """Read test case ids from JSON: a plain list, or a dict with a ``test`` list (as pfn_split_cv0.json)."""
    with open(path) as f:
        content = json.load(f)
    ids = content.get("test") if isinstance(content, dict) else content
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{path} must hold a list of case ids or a dict with a 'test' list of case ids")
    return ids


def choose_test_ids(case_ids: list[str], test_size: int, seed: int) -> list[str]:
    """Return ``test_size`` ids drawn without replacement from the sorted ids with ``numpy`` seed ``seed``."""
    if not 0 <= test_size <= len(case_ids):
        raise ValueError(
            f"--test-size {test_size} must lie in 0..{len(case_ids)} (the number of labeled cases)"
        )
    chosen = np.random.default_rng(seed).permutation(sorted(case_ids))[:test_size]
    return sorted(str(i) for i in chosen)


MIN_TRAINING_CASES = 5  # nnU-Net's 5-fold cross-validation validates at least one case per fold


def make_split(
    case_ids: list[str], test_size: int, seed: int, test_ids_file: Path | None
) -> tuple[list[str], list[str], dict]:
    """Return (train ids, test ids, provenance) from a seeded draw or an explicit test id file; raise ValueError
    when fewer than :data:`MIN_TRAINING_CASES` cases are left for training."""
    if test_ids_file is None:
        test = choose_test_ids(case_ids, test_size, seed)
        provenance = {"source": "random", "seed": seed, "test_size": test_size}
    else:
        test = sorted(load_test_ids(test_ids_file))
        unknown = sorted(set(test).difference(case_ids))
        if unknown or len(set(test)) != len(test):
            raise ValueError(
                f"{test_ids_file}: test ids must be distinct MSD training cases; unknown: {unknown[:10]}"
            )
        provenance = {"source": str(test_ids_file), "seed": None, "test_size": len(test)}
    train = sorted(set(case_ids).difference(test))
    if len(train) < MIN_TRAINING_CASES:
        given = f"--test-size {test_size}" if test_ids_file is None else f"--test-ids {test_ids_file}"
        raise ValueError(f"{given} leaves {len(train)} of the {len(case_ids)} labeled cases for training, but "
                         f"nnU-Net's 5-fold cross-validation needs at least {MIN_TRAINING_CASES}; hold out at most "
                         f"{max(0, len(case_ids) - MIN_TRAINING_CASES)} cases.")
    return train, test, provenance


def split_channels(image_file: Path, num_channels: int) -> list[sitk.Image]:
    """Return the channels of a 4D (x, y, z, channel) image as 3D images with its spatial geometry."""
    image = read_image(image_file)
    if image.GetDimension() != 4 or image.GetSize()[3] != num_channels:
        raise ValueError(
            f"{image_file}: expected a 4D image of size (x, y, z, {num_channels}), got size {image.GetSize()}"
        )
    direction = np.asarray(image.GetDirection()).reshape(4, 4)[:3, :3]
    channels = []
    for array in sitk.GetArrayFromImage(image):  # (channel, z, y, x)
        channel = sitk.GetImageFromArray(array)
        channel.SetSpacing(image.GetSpacing()[:3])
        channel.SetOrigin(image.GetOrigin()[:3])
        channel.SetDirection(direction.flatten().tolist())
        channels.append(channel)
    return channels


def read_label(label_file: Path, image_size: tuple[int, ...]) -> sitk.Image:
    """Read an MSD label map, check its values (0..3) and size, and return it as uint8."""
    label = read_image(label_file)
    if label.GetSize() != image_size:
        raise ValueError(f"{label_file}: size {label.GetSize()} differs from its image's {image_size}")
    values = np.unique(sitk.GetArrayViewFromImage(label))
    unexpected = sorted(set(values.tolist()).difference(int(k) for k in MSD_LABELS))
    if unexpected:
        raise ValueError(f"{label_file}: label values {unexpected} are not MSD Task01 labels 0..3")
    return sitk.Cast(label, sitk.sitkUInt8)


def convert_case(
    case_id: str,
    image_file: Path,
    label_file: Path | None,
    image_dir: Path,
    label_dir: Path | None,
    num_channels: int,
) -> str:
    """Write one case's channel files (and uint8 label, if any); return the case id."""
    channels = split_channels(image_file, num_channels)
    for c, channel in enumerate(channels):
        sitk.WriteImage(channel, str(image_dir / f"{case_id}_{c:04d}{FILE_ENDING}"))
    if label_file is not None:
        label = read_label(label_file, channels[0].GetSize())
        sitk.WriteImage(label, str(label_dir / f"{case_id}{FILE_ENDING}"))
    return case_id


def _convert_job(job: tuple) -> str:
    """Unpack one ``convert_case`` job (for multiprocessing)."""
    return convert_case(*job)


def _run_jobs(jobs: list[tuple], num_processes: int, what: str) -> None:
    """Run conversion jobs, in parallel if asked, printing a progress line every PROGRESS_EVERY cases."""
    if not jobs:
        return
    if num_processes > 1:
        # not multiprocessing.Pool: when a job raises, its __exit__ terminates the pool, and that hung once in CI
        # (test_msd, a damaged file: Pool._terminate_pool waiting forever on a handler thread); the executor
        # cancels the jobs not started, waits for the running ones, then re-raises
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(num_processes, len(jobs)), mp_context=context) as pool:
            futures = [pool.submit(_convert_job, job) for job in jobs]
            try:
                _report_progress((future.result() for future in as_completed(futures)), len(jobs), what)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    else:
        _report_progress(map(_convert_job, jobs), len(jobs), what)


def _report_progress(results, total: int, what: str) -> None:
    """Consume ``results`` and print ``what: done/total`` every PROGRESS_EVERY cases and at the end."""
    for done, _ in enumerate(results, start=1):
        if done % PROGRESS_EVERY == 0 or done == total:
            print(f"{what}: {done}/{total}", flush=True)


def target_folder(dataset_id: int, raw_folder: str | Path | None) -> Path:
    """Return ``RAW/Dataset{ID:03d}_BrainTumour``, RAW being ``raw_folder`` or ``$nnUNet_raw``."""
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset id {dataset_id} must lie in 1..999")
    raw = raw_folder if raw_folder is not None else os.environ.get("nnUNet_raw")
    if not raw:
        raise ValueError("nnUNet_raw is not set: export nnUNet_raw=/path/to/nnUNet_raw or pass -o RAW_FOLDER")
    return Path(raw) / f"Dataset{dataset_id:03d}_{DATASET_NAME}"


def _check_target(target: Path, overwrite: bool) -> None:
    """Refuse a reused dataset id, and a non-empty ``target`` unless ``overwrite``."""
    prefix = target.name.split("_")[0] + "_"
    others = sorted(p.name for p in target.parent.glob(f"{prefix}*") if p.name != target.name)
    if others:
        raise FileExistsError(
            f"dataset id of {target.name} is already used by {others} in {target.parent}; pick another -d"
        )
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass --overwrite to replace it")


def staging_folder(target: Path) -> Path:
    """Where the dataset is written until it is complete (hidden, so nnU-Net never takes it for a dataset)."""
    return target.parent / f".{target.name}.partial"


def _move_into_place(staging: Path, target: Path) -> None:
    """Replace ``target`` (if any) by the complete ``staging`` folder."""
    if target.exists():
        replaced = target.parent / f".{target.name}.replaced"
        shutil.rmtree(replaced, ignore_errors=True)
        target.rename(replaced)
        staging.rename(target)
        shutil.rmtree(replaced)
    else:
        staging.rename(target)


def _write_dataset_json(target: Path, msd: dict, num_training: int) -> None:
    """Write nnU-Net's dataset.json with the WT/TC/ET regions and MSD's channel names and metadata."""
    generate_dataset_json(
        str(target),
        channel_names={int(k): v for k, v in msd["modality"].items()},
        labels=dict(REGIONS),
        num_training_cases=num_training,
        file_ending=FILE_ENDING,
        regions_class_order=REGIONS_CLASS_ORDER,
        dataset_name=DATASET_NAME,
        reference=msd.get("reference"),
        release=msd.get("release"),
        description=msd.get("description"),
        license=msd.get("licence", msd.get("license", "see the Medical Segmentation Decathlon")),
        converted_by="nnunet_ext convert-msd",
    )


def convert_msd_brain_tumour(
    msd_folder: str | Path,
    dataset_id: int = 1,
    raw_folder: str | Path | None = None,
    test_size: int = 49,
    test_ids_file: str | Path | None = None,
    seed: int = 0,
    overwrite: bool = False,
    num_processes: int = 1,
) -> Path:
    """Convert MSD Task01_BrainTumour into ``RAW/Dataset{ID:03d}_BrainTumour``; return that folder."""
    msd_folder = Path(msd_folder)
    msd = load_msd_dataset_json(msd_folder)
    labeled, unlabeled = msd_cases(msd_folder, msd)
    if test_ids_file == PAPER:
        from nnunet_ext.datasets.paper_split import paper_split_path

        test_ids_file = paper_split_path()
    test_ids_file = Path(test_ids_file) if test_ids_file is not None else None
    train, test, provenance = make_split(sorted(labeled), test_size, seed, test_ids_file)
    target = target_folder(dataset_id, raw_folder)
    _check_target(target, overwrite)
    staging = staging_folder(target)
    shutil.rmtree(staging, ignore_errors=True)  # left by a conversion that was killed
    try:
        _convert_into(staging, msd, labeled, unlabeled, train, test, {**provenance, "msd_folder": str(msd_folder)},
                      num_processes)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _move_into_place(staging, target)
    return target


def _convert_into(folder: Path, msd: dict, labeled: dict[str, tuple[Path, Path]], unlabeled: dict[str, Path],
                  train: list[str], test: list[str], provenance: dict, num_processes: int) -> None:
    """Write every case, dataset.json and split.json into ``folder``."""
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "imagesUnlabeled"):
        (folder / sub).mkdir(parents=True)
    num_channels = len(msd["modality"])
    for what, ids, image_dir, label_dir in (
        ("training cases", train, "imagesTr", "labelsTr"),
        ("test cases", test, "imagesTs", "labelsTs"),
    ):
        jobs = [(i, *labeled[i], folder / image_dir, folder / label_dir, num_channels) for i in ids]
        _run_jobs(jobs, num_processes, what)
    jobs = [
        (i, unlabeled[i], None, folder / "imagesUnlabeled", None, num_channels) for i in sorted(unlabeled)
    ]
    _run_jobs(jobs, num_processes, "unlabeled cases")
    _write_dataset_json(folder, msd, len(train))
    split = {"train": train, "test": test, "unlabeled": sorted(unlabeled), **provenance}
    (folder / "split.json").write_text(json.dumps(split, indent=2))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``nnunet-ext convert-msd`` arguments."""
    parser.add_argument(
        "-i", "--input", required=True, help="MSD Task01_BrainTumour folder (with dataset.json)"
    )
    parser.add_argument("-d", "--dataset-id", type=int, default=1, help="nnU-Net dataset id. Default: 1")
    parser.add_argument(
        "-o",
        "--raw-folder",
        default=None,
        help="nnU-Net raw folder to write Dataset{ID:03d}_BrainTumour into. Default: $nnUNet_raw",
    )
    split = parser.add_mutually_exclusive_group()
    split.add_argument(
        "--test-size",
        type=int,
        default=49,
        help="number of labeled cases held out as test set, drawn with --seed; at least 5 must be left for "
        "training (5-fold cross-validation). Default: 49",
    )
    split.add_argument(
        "--test-ids",
        default=None,
        help="JSON file with the test case ids: a list, or a dict with a 'test' list; 'paper' for the paper's "
        "49 test cases (shipped with nnunet_ext; see nnunet-ext paper-split)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the test draw. Default: 0")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing non-empty target folder"
    )
    parser.add_argument(
        "-np",
        type=int,
        default=default_num_processes,
        help=f"number of processes. Default: {default_num_processes}",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``nnunet-ext convert-msd``; return 0."""
    target = convert_msd_brain_tumour(
        args.input,
        args.dataset_id,
        args.raw_folder,
        args.test_size,
        args.test_ids,
        args.seed,
        args.overwrite,
        args.np,
    )
    print(f"wrote {target} (split in {target / 'split.json'})")
    return 0
