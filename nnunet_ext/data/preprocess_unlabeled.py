"""Preprocess ``imagesUnlabeled/`` with the dataset's own plans, preprocessor and data format.

Writes ``$nnUNet_preprocessed/DatasetXXX/<data_identifier>_unlabeled/`` (nnU-Net's dataset classes need
one file type per folder) plus ``unlabeled_manifest.json`` with a content hash per case and the labeled
or test cases it duplicates. Idempotent: finished cases are skipped. Each case is checked first (channel
count, equal channel shapes, readable files, finite voxels) and written through a staging folder, so a
failure names the file at fault and never damages cases already preprocessed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import shutil

import numpy as np

from nnunet_ext.data.pool import MANIFEST, UNLABELED_RAW, unlabeled_folder


def raw_cases(folder: str, file_ending: str, num_channels: int) -> dict[str, list[str]]:
    """Group ``CASE_XXXX<ending>`` files by case; fail naming a case whose channel files are incomplete."""
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(file_ending)}$")
    cases: dict[str, dict[int, str]] = {}
    for f in sorted(os.listdir(folder)):
        match = pattern.match(f)
        if f.startswith(".") or not f.endswith(file_ending):
            continue
        if match is None:
            raise ValueError(f"{os.path.join(folder, f)}: expected nnU-Net naming CASE_XXXX{file_ending} "
                             f"(channel index as 4 digits).")
        cases.setdefault(match.group(1), {})[int(match.group(2))] = os.path.join(folder, f)
    expected = list(range(num_channels))
    for case, channels in cases.items():
        if sorted(channels) != expected:
            raise ValueError(f"{folder}: case '{case}' has channel files {sorted(channels)}, but dataset.json "
                             f"lists {num_channels} channels (expected {case}_0000..{case}_{num_channels - 1:04d}"
                             f"{file_ending}).")
    return {case: [channels[c] for c in expected] for case, channels in cases.items()}


def file_hash(path: str) -> str:
    """SHA-1 of a file's bytes (finds copied images under another name)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _nifti_is_finite(path: str) -> bool:
    """SimpleITK's NIfTI reader silently turns NaN/inf into 0, so NIfTI files are checked with nibabel."""
    if not path.endswith((".nii", ".nii.gz")):
        return True
    import nibabel

    return bool(np.isfinite(np.asanyarray(nibabel.load(path).dataobj)).all())


def load_checked(image_files: list[str], reader) -> tuple[np.ndarray, dict]:
    """Read one case's channels (C, *spatial); raise ValueError naming a file that is unreadable,
    mis-shaped, of another spacing or not finite.

    nnU-Net's reader checks shape and spacing across the channels it reads together, but fails with a
    bare RuntimeError; reading channel by channel lets every error name its file.
    """
    arrays, spacings, properties = [], [], None
    for f in image_files:
        try:
            data, props = reader.read_images([f])
        except Exception as e:  # any reader failure: name the file
            raise ValueError(f"{f}: cannot be read as an image ({type(e).__name__}: {e}).") from e
        if not (np.isfinite(data).all() and _nifti_is_finite(f)):
            raise ValueError(f"{f}: contains NaN or infinite voxels; fix or remove this image.")
        spacing = tuple(float(s) for s in props["spacing"])
        if arrays and data.shape[1:] != arrays[0].shape[1:]:
            raise ValueError(f"{f}: shape {data.shape[1:]} differs from {image_files[0]} "
                             f"{arrays[0].shape[1:]}; all channels of a case must have the same shape.")
        if spacings and spacing != spacings[0]:
            raise ValueError(f"{f}: spacing {spacing} differs from {image_files[0]} {spacings[0]}; all channels "
                             f"of a case must have the same spacing.")
        arrays.append(data)
        spacings.append(spacing)
        properties = properties or props
    return np.vstack(arrays), properties


def preprocess_case(case: str, image_files: list[str], output_folder: str, plans_manager, configuration_manager,
                    dataset_json: dict) -> str:
    """Check and preprocess one case with nnU-Net's own preprocessor; files appear only when complete."""
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    data, properties = load_checked(image_files, plans_manager.image_reader_writer_class())
    staging = os.path.join(output_folder, f".staging_{case}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        data, seg, properties = preprocessor.run_case_npy(data, None, properties, plans_manager,
                                                          configuration_manager, dataset_json)
        properties["class_locations"] = {}  # no labels: never sample foreground from an unlabeled image
        _save(data, seg, properties, os.path.join(staging, case), configuration_manager)
        names = sorted(os.listdir(staging), key=lambda n: n.endswith(".pkl"))  # properties last = case complete
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(output_folder, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return case


def _save(data: np.ndarray, seg: np.ndarray, properties: dict, truncated: str, configuration_manager) -> None:
    """Save like nnU-Net's preprocessor does (blosc2, chunks fitted to the patch size): the end of
    ``DefaultPreprocessor.run_case_save``, whose start (reading the files) ``load_checked`` replaces."""
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2

    data = data.astype(np.float32, copy=False)
    seg = seg.astype(np.int16, copy=False)
    patch = tuple(configuration_manager.patch_size)
    blocks, chunks = comp_blosc2_params(data.shape, patch, data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, patch, seg.itemsize)
    nnUNetDatasetBlosc2.save_case(data, seg, properties, truncated, chunks=chunks, blocks=blocks,
                                  chunks_seg=chunks_seg, blocks_seg=blocks_seg)


def labeled_hashes(raw_folder: str, file_ending: str) -> dict[str, str]:
    """Hash of channel 0 of every labeled training and test image -> 'imagesTr/CASE' (for duplicate warnings)."""
    hashes = {}
    for split in ("imagesTr", "imagesTs"):
        folder = os.path.join(raw_folder, split)
        if os.path.isdir(folder):
            for f in sorted(os.listdir(folder)):
                if f.endswith("_0000" + file_ending):
                    hashes[file_hash(os.path.join(folder, f))] = f"{split}/{f[:-len('_0000' + file_ending)]}"
    return hashes


def preprocess_unlabeled(dataset_id: int | str, configurations: list[str], plans: str = "nnUNetPlans",
                         num_processes: int = 1) -> dict[str, str]:
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
    cases = raw_cases(source, dataset_json["file_ending"], len(dataset_json["channel_names"]))
    known = labeled_hashes(raw, dataset_json["file_ending"])
    manifest = {}
    for case, files in cases.items():
        digest = file_hash(files[0])
        manifest[case] = {"sha1_channel0": digest, "duplicate_of": known.get(digest)}
        if known.get(digest):
            print(f"[preprocess-unlabeled] WARNING: {files[0]} is a copy of {known[digest]}; trainers exclude it "
                  f"whenever that case is a validation or test case")
    outputs = {}
    for configuration in configurations:
        cm = plans_manager.get_configuration(configuration)
        out = unlabeled_folder(os.path.join(nnUNet_preprocessed, name), cm.data_identifier)
        os.makedirs(out, exist_ok=True)
        todo = [c for c in cases if not os.path.isfile(os.path.join(out, c + ".pkl"))]
        print(f"[preprocess-unlabeled] {name} {configuration}: {len(cases)} cases, {len(cases) - len(todo)} "
              f"already done, {len(todo)} to go -> {out}", flush=True)
        jobs = [(c, cases[c], out, plans_manager, cm, dataset_json) for c in todo]
        if num_processes > 1 and len(jobs) > 1:
            with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
                for i, case in enumerate(pool.starmap(preprocess_case, jobs, chunksize=1)):
                    print(f"[preprocess-unlabeled] {i + 1}/{len(jobs)} {case}", flush=True)
        else:
            for i, job in enumerate(jobs):
                preprocess_case(*job)
                print(f"[preprocess-unlabeled] {i + 1}/{len(jobs)} {job[0]}", flush=True)
        _write_if_changed(os.path.join(out, MANIFEST), manifest)
        outputs[configuration] = out
    return outputs


def _write_if_changed(path: str, content: dict) -> None:
    """Write JSON unless the file already holds exactly this content (keeps reruns side-effect free)."""
    if os.path.isfile(path):
        with open(path) as f:
            if json.load(f) == content:
                return
    with open(path, "w") as f:
        json.dump(content, f, indent=2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments follow nnUNetv2_preprocess."""
    parser.add_argument("-d", required=True, help="dataset id or name")
    parser.add_argument("-c", nargs="+", default=["3d_fullres"], help="configurations (default 3d_fullres)")
    parser.add_argument("-p", "-plans_name", dest="plans", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("-np", type=int, default=1, help="processes (default 1)")


def run(args: argparse.Namespace) -> int:
    """Preprocess and print the output folders."""
    for configuration, out in preprocess_unlabeled(args.d, args.c, args.plans, args.np).items():
        print(f"[preprocess-unlabeled] {configuration}: {out}")
    return 0
