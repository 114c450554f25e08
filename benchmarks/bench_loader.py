"""Throughput of the two streams of semi-supervised training on a preprocessed dataset.

A semi-supervised step takes one batch from each: nnU-Net's own ``nnUNetDataLoader`` over the labeled cases
(the labeled stream, exactly the supervised trainers') and ``UnlabeledDataLoader`` over the unlabeled cases.
Both get what ``nnUNetTrainer.get_dataloaders`` gives its training loader: the plans' batch size and patch
size, nnU-Net's initial (pre-rotation) patch size, the transforms of ``nnUNetTrainer.get_training_transforms``
(with deep-supervision targets) and batchgenerators' NonDetMultiThreadedAugmenter (SingleThreadedAugmenter
for ``--workers 0``); the labeled one oversamples foreground (0.33), the unlabeled one never does. Unlabeled
cases: the preprocessed ``<data_identifier>_unlabeled`` folder (``nnunet-ext preprocess-unlabeled``) when
it exists, otherwise the second half of the training cases.

Each loader first delivers ``--warmup-batches`` untimed batches once (page cache, lazy imports). Then each
round builds a fresh loader and augmenter, waits for the first batch (worker start-up, reported
separately) and times ``--batches`` batches; the loaders alternate across ``--rounds`` and the median
rate is reported. Nothing consumes the batches, so this is the rate at which the workers can produce them.

    python benchmarks/bench_loader.py -d 995 -p nnUNetCPUGNPlans -c 3d_fullres --workers 2 --batches 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import NoReturn

from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import load_json
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class, nnUNetBaseDataset
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_ext.data.pool import complete_cases, unlabeled_folder
from nnunet_ext.data.unlabeled import UnlabeledDataLoader, UnlabeledDataset

RESULTS = Path(__file__).resolve().parent / "results"
LOADERS = ("nnUNetDataLoader (labeled stream)", "UnlabeledDataLoader (unlabeled stream)")
OVERSAMPLE_FOREGROUND = 0.33  # nnUNetTrainer.oversample_foreground_percent


@dataclass
class LoaderInputs:
    """Everything both loaders are built from."""

    labeled: nnUNetBaseDataset
    unlabeled: nnUNetBaseDataset
    unlabeled_source: str
    batch_size: int
    initial_patch_size: tuple[int, ...]
    patch_size: tuple[int, ...]
    label_manager: LabelManager
    transforms: BasicTransform


def fail(message: str) -> NoReturn:
    """Stop with ``message`` on stderr and exit status 2."""
    print(f"[bench_loader] error: {message}", file=sys.stderr)
    sys.exit(2)


def loader_inputs(dataset: str, plans: str, configuration: str) -> LoaderInputs:
    """Read plans and preprocessed data; build nnU-Net's training transforms like ``get_dataloaders`` does."""
    if not nnUNet_preprocessed.is_set():
        fail("nnUNet_preprocessed is not set; export it to the folder holding the preprocessed dataset")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        fail(f"-d {dataset}: {e}")
    base = os.path.join(nnUNet_preprocessed.get(), name)
    plans_file = os.path.join(base, plans + ".json")
    if not os.path.isfile(plans_file):
        fail(f"{plans_file} not found; check -p (plans identifier) or plan the dataset first")
    plans_manager = PlansManager(plans_file)
    if configuration not in plans_manager.available_configurations:
        fail(f"-c {configuration}: {plans_file} has configurations {plans_manager.available_configurations}")
    cm = plans_manager.get_configuration(configuration)
    if cm.previous_stage_name is not None:
        fail(f"-c {configuration} is a cascade stage (needs the previous stage's predictions); use a full-resolution "
             f"or 2d configuration")
    folder = os.path.join(base, cm.data_identifier)
    if not os.path.isdir(folder):
        fail(f"{folder} not found; preprocess it: nnUNetv2_preprocess -d {dataset} -plans_name {plans} "
             f"-c {configuration}")
    label_manager = plans_manager.get_label_manager(load_json(os.path.join(base, "dataset.json")))
    dataset_class = infer_dataset_class(folder)
    ids = sorted(complete_cases(dataset_class, folder))
    extra = unlabeled_folder(base, cm.data_identifier)
    # same file format as the labeled folder (preprocess-unlabeled writes it so), as SemiSupervisedMixin assumes
    extra_ids = sorted(complete_cases(dataset_class, extra)) if os.path.isdir(extra) else []
    if extra_ids:
        labeled = dataset_class(folder, ids)
        unlabeled = dataset_class(extra, extra_ids)
        source = f"{len(extra_ids)} preprocessed imagesUnlabeled ({extra})"
    else:
        if len(ids) < 2:
            fail(f"{folder} has {len(ids)} case(s) and there is no {extra}; need 2 cases to split into labeled and "
                 f"unlabeled halves")
        half = len(ids) // 2
        labeled, unlabeled = dataset_class(folder, ids[:-half]), dataset_class(folder, ids[-half:])
        source = f"second half of the training cases ({half}; no {extra})"
    # nnU-Net's own methods, called on a stand-in holding the attributes they read
    trainer_view = SimpleNamespace(configuration_manager=cm, enable_deep_supervision=True,
                                   print_to_log_file=lambda *args, **kwargs: None)
    rotation, dummy_2d, initial_patch_size, mirror_axes = \
        nnUNetTrainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size(trainer_view)
    transforms = nnUNetTrainer.get_training_transforms(
        cm.patch_size, rotation, nnUNetTrainer._get_deep_supervision_scales(trainer_view), mirror_axes, dummy_2d,
        use_mask_for_norm=cm.use_mask_for_norm, is_cascaded=False,
        foreground_labels=label_manager.foreground_labels,
        regions=label_manager.foreground_regions if label_manager.has_regions else None,
        ignore_label=label_manager.ignore_label)
    return LoaderInputs(labeled, unlabeled, source, cm.batch_size, tuple(initial_patch_size), tuple(cm.patch_size),
                        label_manager, transforms)


def make_loader(kind: str, inputs: LoaderInputs) -> nnUNetDataLoader:
    """nnU-Net's training loader over the labeled cases, or the unlabeled stream's over the unlabeled cases."""
    if kind == LOADERS[0]:
        return nnUNetDataLoader(inputs.labeled, inputs.batch_size, inputs.initial_patch_size, inputs.patch_size,
                                inputs.label_manager, oversample_foreground_percent=OVERSAMPLE_FOREGROUND,
                                sampling_probabilities=None, pad_sides=None, transforms=inputs.transforms,
                                probabilistic_oversampling=False)
    return UnlabeledDataLoader(UnlabeledDataset([inputs.unlabeled]), inputs.batch_size, inputs.initial_patch_size,
                               inputs.patch_size, inputs.label_manager, transforms=inputs.transforms)


def augmenter(loader: nnUNetDataLoader, workers: int) -> SingleThreadedAugmenter | NonDetMultiThreadedAugmenter:
    """The augmenter ``nnUNetTrainer.get_dataloaders`` wraps its training loader in (no pinned memory)."""
    if workers == 0:
        return SingleThreadedAugmenter(loader, None)
    return NonDetMultiThreadedAugmenter(data_loader=loader, transform=None, num_processes=workers,
                                        num_cached=max(6, workers // 2), seeds=None, pin_memory=False,
                                        wait_time=0.002)


def time_round(kind: str, inputs: LoaderInputs, workers: int, batches: int) -> dict:
    """Seconds to the first batch, then the rate of the next ``batches`` batches, for a fresh loader."""
    start = time.perf_counter()
    generator = augmenter(make_loader(kind, inputs), workers)
    try:
        first = next(generator)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(batches):
            next(generator)
        elapsed = time.perf_counter() - start
    finally:
        if isinstance(generator, NonDetMultiThreadedAugmenter):
            generator._finish()
    composition = f"{first['data'].shape[0]} {'with' if 'target' in first else 'without'} target"
    return {"batches_per_s": batches / elapsed, "first_batch_s": first_s, "composition": composition,
            "data_shape": list(first["data"].shape)}


def markdown_table(results: dict[str, list[dict]]) -> str:
    """One row per loader: median rate over rounds, ratio to nnU-Net's loader, batch composition, start-up."""
    base = statistics.median(r["batches_per_s"] for r in results[LOADERS[0]])
    rows = ["| loader | batches/s (median) | ×labeled stream | samples per batch | first batch s (median) |",
            "|---|---:|---:|---|---:|"]
    for kind, rounds in results.items():
        rate = statistics.median(r["batches_per_s"] for r in rounds)
        rows.append(f"| {kind} | {rate:.2f} | {rate / base:.2f}x | {rounds[0]['composition']} "
                    f"| {statistics.median(r['first_batch_s'] for r in rounds):.2f} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments (dataset, plans and configuration as in nnUNetv2_train)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", required=True, help="dataset id or name (preprocessed under $nnUNet_preprocessed)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    parser.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    parser.add_argument("--workers", type=int, default=2,
                        help="augmentation processes, as nnUNet_n_proc_DA (0: in this process; default 2)")
    parser.add_argument("--batches", type=int, default=50, help="timed batches per round (default 50)")
    parser.add_argument("--warmup-batches", type=int, default=10,
                        help="untimed batches of each loader before the rounds (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per loader, alternating (default 3)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default: results/loader_<dataset>.json next to this script)")
    args = parser.parse_args(argv)
    if args.workers < 0 or args.batches < 1 or args.rounds < 1 or args.warmup_batches < 0:
        parser.error(f"need --workers >= 0, --batches >= 1, --rounds >= 1, --warmup-batches >= 0 (got "
                     f"{args.workers}, {args.batches}, {args.rounds}, {args.warmup_batches})")
    return args


def main(argv: list[str] | None = None) -> int:
    """Time both loaders, print the table, write the JSON."""
    args = parse_args(argv)
    inputs = loader_inputs(args.d, args.p, args.c)
    name = maybe_convert_to_dataset_name(args.d)
    print(f"[bench_loader] {name} {args.p} {args.c}: batch {inputs.batch_size}, patch {list(inputs.patch_size)}, "
          f"{len(inputs.labeled.identifiers)} labeled cases, unlabeled: {inputs.unlabeled_source}; "
          f"{args.workers} workers", flush=True)
    if args.warmup_batches:
        for kind in LOADERS:
            time_round(kind, inputs, args.workers, args.warmup_batches)
        print(f"[bench_loader] warm-up: {args.warmup_batches} batches of each loader", flush=True)
    results: dict[str, list[dict]] = {kind: [] for kind in LOADERS}
    for r in range(args.rounds):
        for kind in (LOADERS if r % 2 == 0 else LOADERS[::-1]):
            result = time_round(kind, inputs, args.workers, args.batches)
            results[kind].append(result)
            print(f"[bench_loader] round {r + 1}/{args.rounds} {kind}: {result['batches_per_s']:.2f} batches/s "
                  f"(first batch {result['first_batch_s']:.2f} s)", flush=True)
    out = args.out or RESULTS / f"loader_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    environment = {"dataset": name, "plans": args.p, "configuration": args.c, "workers": args.workers,
                   "batches": args.batches, "warmup_batches": args.warmup_batches, "rounds": args.rounds,
                   "batch_size": inputs.batch_size, "patch_size": list(inputs.patch_size),
                   "labeled_cases": len(inputs.labeled.identifiers), "unlabeled_source": inputs.unlabeled_source,
                   "cpu_count": os.cpu_count(), "python": platform.python_version()}
    out.write_text(json.dumps({"environment": environment, "results": results}, indent=2) + "\n")
    print()
    print(markdown_table(results))
    print(f"\n[bench_loader] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
