"""Preprocess ``imagesUnlabeled/`` with the dataset's own plans and preprocessor, written as that preprocessor
writes (so in the file format the trainer's ``infer_dataset_class`` reads).

Writes ``$nnUNet_preprocessed/DatasetXXX/<data_identifier>_unlabeled/`` (nnU-Net's dataset classes need
one file type per folder) and one record per case in its ``manifest/`` folder: the raw files it was made
from (size, mtime), the content of each channel, the imagesTr/imagesTs cases it copies (by content, see
:mod:`nnunet_ext.data.duplicates`), every case id it was compared with, and warnings. The record is
written before the case's files and the properties file comes last, so no interruption can leave a
complete case without its duplicate check. Idempotent: cases whose raw files are unchanged are skipped
(their records are brought up to date when imagesTr/imagesTs changed). Each case is checked first
(:func:`nnunet_ext.data.raw_cases.load_checked`) and written through a staging folder, so a failure names
the file at fault and never damages cases already preprocessed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil

from nnunet_ext.data.duplicates import CONTENT_SCHEME, ReferenceIndex, channel_contents, reference_index
from nnunet_ext.data.pool import MANIFEST, UNLABELED_RAW, record_path, unlabeled_folder
from nnunet_ext.data.raw_cases import file_signature, load_checked, raw_cases
from nnunet_ext.files import write_json_atomic  # also imported from here by nnunet_ext.selftrain


def duplicate_check(index: ReferenceIndex, channels: list[dict]) -> dict:
    """The record fields the trainers read: the cases ``channels`` copy (and the evidence for each), every case
    id compared with, and the version of the rule."""
    copies = index.copies_of(channels)
    return {"duplicate_of": copies, "copy_evidence": {c: index.evidence(channels, c) for c in copies},
            "checked_against": index.ids, "content_scheme": CONTENT_SCHEME}


def preprocess_case(case: str, image_files: list[str], output_folder: str, plans_manager, configuration_manager,
                    dataset_json: dict, index: ReferenceIndex, accept_misaligned: bool = False) -> str:
    """Check, hash and preprocess one case; its record is in place before its properties file (case complete)."""
    from nnunet_ext.compat import save_preprocessed_case  # imports nnU-Net's trainer: keep --help fast

    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    raw = load_checked(image_files, plans_manager.image_reader_writer_class(), index.dimension, accept_misaligned)
    channels = channel_contents(raw.data, raw.geometries)
    record = {"files": file_signature(image_files), "channels": channels, "warnings": raw.warnings,
              **duplicate_check(index, channels)}
    for warning in raw.warnings:
        print(f"[preprocess-unlabeled] WARNING: {warning} (accepted, recorded in {record_path(output_folder, case)})")
    if record["duplicate_of"]:
        evidence = "; ".join(f"{c} ({e})" for c, e in record["copy_evidence"].items())
        print(f"[preprocess-unlabeled] {case} is a copy of {evidence}; trainers exclude it whenever that case is a "
              f"test, validation or labeled case", flush=True)
    properties_file = os.path.join(output_folder, case + ".pkl")
    if os.path.isfile(properties_file):
        os.remove(properties_file)  # redone because its raw files changed: incomplete until the new files are in
    staging = os.path.join(output_folder, f".staging_{case}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        data, seg, properties = preprocessor.run_case_npy(raw.data, None, raw.properties, plans_manager,
                                                          configuration_manager, dataset_json)
        properties["class_locations"] = {}  # no labels: never sample foreground from an unlabeled image
        save_preprocessed_case(preprocessor, os.path.join(staging, case), (data, seg, properties), image_files,
                               plans_manager, configuration_manager, dataset_json)
        write_json_atomic(record_path(output_folder, case), record)
        names = sorted(os.listdir(staging), key=lambda n: n.endswith(".pkl"))  # properties last = case complete
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(output_folder, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return case


def preprocess_unlabeled(dataset_id: int | str, configurations: list[str], plans: str = "nnUNetPlans",
                         num_processes: int = 1, accept_misaligned: bool = False) -> dict[str, str]:
    """Preprocess imagesUnlabeled for each configuration; return {configuration: output folder}."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    name = maybe_convert_to_dataset_name(dataset_id)
    raw = os.path.join(nnUNet_raw, name)
    source = os.path.join(raw, UNLABELED_RAW)
    if not os.path.isdir(source):
        raise FileNotFoundError(f"{source} does not exist: put unlabeled images there (nnU-Net naming "
                                f"CASE_0000.nii.gz, ...), e.g. MSD's imagesTs.")
    plans_file = os.path.join(nnUNet_preprocessed, name, plans + ".json")
    if not os.path.isfile(plans_file):
        raise FileNotFoundError(f"{plans_file} not found: plan and preprocess the labeled data first "
                                f"(nnunet-ext plan / nnUNetv2_plan_and_preprocess).")
    plans_manager = PlansManager(plans_file)
    dataset_json = load_json(os.path.join(nnUNet_preprocessed, name, "dataset.json"))
    file_ending, num_channels = dataset_json["file_ending"], len(dataset_json["channel_names"])
    cases = raw_cases(source, file_ending, num_channels)
    index = reference_index(raw, file_ending, num_channels, plans_manager.image_reader_writer_class,
                            os.path.join(nnUNet_preprocessed, name), num_processes)
    outputs = {}
    for configuration in configurations:
        cm = plans_manager.get_configuration(configuration)
        out = unlabeled_folder(os.path.join(nnUNet_preprocessed, name), cm.data_identifier)
        os.makedirs(os.path.join(out, MANIFEST), exist_ok=True)
        todo = [c for c in cases if not _up_to_date(out, c, cases[c], index)]
        print(f"[preprocess-unlabeled] {name} {configuration}: {len(cases)} cases, {len(cases) - len(todo)} "
              f"already done, {len(todo)} to go -> {out}", flush=True)
        jobs = [(c, cases[c], out, plans_manager, cm, dataset_json, index, accept_misaligned) for c in todo]
        if num_processes > 1 and len(jobs) > 1:
            with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
                for i, case in enumerate(pool.starmap(preprocess_case, jobs, chunksize=1)):
                    print(f"[preprocess-unlabeled] {i + 1}/{len(jobs)} {case}", flush=True)
        else:
            for i, job in enumerate(jobs):
                preprocess_case(*job)
                print(f"[preprocess-unlabeled] {i + 1}/{len(jobs)} {job[0]}", flush=True)
        outputs[configuration] = out
    return outputs


def _up_to_date(folder: str, case: str, files: list[str], index: ReferenceIndex) -> bool:
    """Whether a case is complete and made from today's raw files; brings its duplicate check up to date."""
    path = record_path(folder, case)
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(folder, case + ".pkl"))):
        return False
    with open(path) as f:
        record = json.load(f)
    if record["files"] != file_signature(files) or record.get("content_scheme") != CONTENT_SCHEME:
        return False  # raw files changed, or hashed by an older rule (e.g. blind to edited headers)
    check = duplicate_check(index, record["channels"])
    if check["duplicate_of"] != record["duplicate_of"]:
        print(f"[preprocess-unlabeled] {case}: now a copy of {check['duplicate_of'] or 'no case'} (was "
              f"{record['duplicate_of'] or 'none'}): imagesTr/imagesTs changed", flush=True)
    write_json_if_changed(path, {**record, **check})
    return True


def write_json_if_changed(path: str, content: dict) -> None:
    """Write JSON atomically unless the file already holds exactly this content (keeps reruns side-effect free)."""
    if os.path.isfile(path):
        with open(path) as f:
            if json.load(f) == content:
                return
    write_json_atomic(path, content)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments follow nnUNetv2_preprocess."""
    parser.add_argument("-d", required=True, help="dataset id or name")
    parser.add_argument("-c", nargs="+", default=["3d_fullres"], help="configurations (default 3d_fullres)")
    parser.add_argument("-p", "-plans_name", dest="plans", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("-np", type=int, default=1, help="processes (default 1)")
    parser.add_argument("--accept-misaligned-channels", action="store_true",
                        help="use cases whose channels differ in origin or direction (an error by default); the "
                             "difference is written into the case's record in manifest/")


def run(args: argparse.Namespace) -> int:
    """Preprocess and print the output folders."""
    for configuration, out in preprocess_unlabeled(args.d, args.c, args.plans, args.np,
                                                   args.accept_misaligned_channels).items():
        print(f"[preprocess-unlabeled] {configuration}: {out}")
    return 0
