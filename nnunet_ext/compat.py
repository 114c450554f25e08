"""Every place where nnunet_ext relies on nnU-Net internals that nnU-Net does not offer as extension points.

Each coupling says which nnU-Net code it depends on and why, and checks its precondition so that an
nnU-Net release that changes the code fails loudly, naming the coupling, instead of training wrongly.
``tests/test_compat.py`` asserts each precondition against the installed nnU-Net.

- :func:`network_built_by`: the training network is net + branch, the inference network stays plain.
- :func:`captured_augmentation`: the unlabeled stream reuses the labeled stream's transforms and patch size.
- :func:`random_crops_only`: the unlabeled loader never crops around labels.
- :func:`after_zero_grad`: the unlabeled pass accumulates into nnU-Net's optimizer step.
- :func:`seeded_augmenters`: ``_s<S>`` trainers seed nnU-Net's augmentation workers.
- :func:`captured_checkpoint_save`, :func:`captured_checkpoint_load`: the branch rides in nnU-Net's checkpoint.
- :func:`unwrap_network`: the module inside DDP and torch.compile.
- :func:`save_preprocessed_case`: preprocess-unlabeled writes cases exactly as nnU-Net's preprocessor does.
- :func:`planning_n_proc_DA`: nnU-Net's planner crashes with ``nnUNet_n_proc_DA=0``.
- :func:`accept_pretrained_weights`: ``-pretrained_weights`` loads what matches (e.g. an encoder) into our trainers.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import os
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, TypeVar

import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from torch import nn
from torch._dynamo import OptimizedModule  # torch.compile's wrapper; nnU-Net unwraps it the same way
from torch.nn.parallel import DistributedDataParallel

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class CompatibilityError(RuntimeError):
    """nnU-Net no longer behaves as a coupling of nnunet_ext expects."""

    def __init__(self, coupling: str, expected: str):
        super().__init__(f"nnunet_ext coupling '{coupling}' expects {expected}, which nnunetv2 {version('nnunetv2')} "
                         f"does not do; nnunet_ext supports nnunetv2 2.8.x (see nnunet_ext/compat.py)")


@contextlib.contextmanager
def _routed_once(instance: object, method: str, replacement: Callable, coupling: str, expected: str) -> Iterator[None]:
    """While the block runs, ``instance.<method>`` is ``replacement`` (an instance attribute that shadows the
    class's method, so the class and other instances are untouched). Checked: the block calls it exactly once,
    with arguments that fit ``replacement``'s signature (which callers that inspect it see)."""
    calls = []
    signature = inspect.signature(replacement)

    @functools.wraps(replacement)
    def routed(*args, **kwargs):
        try:
            signature.bind(*args, **kwargs)
        except TypeError as error:
            raise CompatibilityError(coupling, f"{expected} with arguments {signature} ({error})") from None
        calls.append(True)
        return replacement(*args, **kwargs)

    setattr(instance, method, routed)
    try:
        yield
    finally:
        delattr(instance, method)  # the class's method is back
    if len(calls) != 1:
        raise CompatibilityError(coupling, f"{expected} exactly once (called {len(calls)} times)")


@contextlib.contextmanager
def network_built_by(trainer, builder: Callable[..., nn.Module]) -> Iterator[None]:
    """While the block runs (``nnUNetTrainer.initialize``), the trainer's network is built by ``builder``.

    nnU-Net's ``initialize`` builds the training network with ``self.build_network_architecture(plans_manager,
    configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision)`` (that calling
    convention because the method's signature has a ``plans_manager`` parameter), then compiles it, builds the
    optimizer over its parameters and wraps it in DDP. nnU-Net offers no hook between building and those
    steps, so the branch must exist when the builder returns. ``nnUNetPredictor`` calls the static
    ``build_network_architecture`` of the class, so an instance attribute changes training only and the
    branch never exists at inference. Precondition, checked: ``initialize`` calls it once, through ``self``,
    with those arguments.
    """
    with _routed_once(trainer, "build_network_architecture", builder, "network_built_by",
                      "nnUNetTrainer.initialize to call self.build_network_architecture"):
        yield


@dataclass
class AugmentationSetup:
    """What ``nnUNetTrainer.get_dataloaders`` built its training loader with."""

    transforms: Any = None
    initial_patch_size: tuple[int, ...] | None = None


@contextlib.contextmanager
def captured_augmentation(trainer) -> Iterator[AugmentationSetup]:
    """While the block runs (``nnUNetTrainer.get_dataloaders``), record its training transforms and the
    initial (pre-rotation) patch size of its training loader.

    nnU-Net builds both inline in ``get_dataloaders``, from
    ``self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()`` and ``self.get_training_transforms(...)``,
    and keeps neither. The unlabeled stream of semi-supervised trainers must crop and augment exactly like the
    labeled one, so it reuses these very objects instead of rebuilding them with a copy of nnU-Net's argument
    list. Precondition, checked: ``get_dataloaders`` calls each once, through ``self``.
    """
    setup = AugmentationSetup()
    configure = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size
    transforms = trainer.get_training_transforms

    @functools.wraps(configure)
    def recording_configure(*args, **kwargs):
        result = configure(*args, **kwargs)
        setup.initial_patch_size = tuple(int(s) for s in result[2])
        return result

    @functools.wraps(transforms)
    def recording_transforms(*args, **kwargs):
        setup.transforms = transforms(*args, **kwargs)
        return setup.transforms

    expected = "nnUNetTrainer.get_dataloaders to call self.{}"
    with _routed_once(trainer, "configure_rotation_dummyDA_mirroring_and_inital_patch_size", recording_configure,
                      "captured_augmentation",
                      expected.format("configure_rotation_dummyDA_mirroring_and_inital_patch_size")), \
            _routed_once(trainer, "get_training_transforms", recording_transforms, "captured_augmentation",
                         expected.format("get_training_transforms")):
        yield setup


def random_crops_only(loader) -> None:
    """Make an ``nnUNetDataLoader`` crop at random only: never around foreground, nor around annotated voxels.

    ``nnUNetDataLoader.get_bbox`` crops around a labeled voxel when ``force_fg`` (``get_do_oversample``; never
    with ``oversample_foreground_percent`` 0, in both of nnU-Net's oversampling modes) or when ``self.has_ignore``
    (datasets with an ignore label); both read the case's ``class_locations``, which unlabeled images do not
    have. nnU-Net sets ``has_ignore`` from the label manager, with no argument to turn it off. Preconditions,
    checked: the loader has that attribute, and never forces foreground.
    """
    if not hasattr(loader, "has_ignore"):
        raise CompatibilityError("random_crops_only", "nnUNetDataLoader to decide annotated-voxel cropping by its "
                                                      "attribute has_ignore")
    loader.has_ignore = False
    if any(loader.get_do_oversample(j) for j in range(loader.batch_size)):
        raise CompatibilityError("random_crops_only", "nnUNetDataLoader never to force foreground with "
                                                      "oversample_foreground_percent=0")


@contextlib.contextmanager
def after_zero_grad(optimizer: torch.optim.Optimizer, action: Callable[[], None]) -> Iterator[None]:
    """Run ``action`` right after the next ``optimizer.zero_grad()``, exactly once, inside the block.

    Mirrors the order of ``nnUNetTrainer.train_step``: ``zero_grad`` -> forward -> loss -> backward ->
    (unscale) -> clip -> step. Semi-supervised trainers accumulate the gradient of a second (unlabeled) pass
    into the same optimizer step; it must run after nnU-Net clears the gradients and before its forward, and
    nnU-Net has no hook there. Precondition, checked: the block calls ``zero_grad`` exactly once.
    """
    calls = []
    original = optimizer.zero_grad

    def zero_grad_then_action(*args, **kwargs):
        original(*args, **kwargs)
        calls.append(True)
        if len(calls) == 1:
            action()

    optimizer.zero_grad = zero_grad_then_action
    try:
        yield
    finally:
        del optimizer.zero_grad  # the instance attribute; the class method is back
    if len(calls) != 1:
        raise CompatibilityError("after_zero_grad", f"nnUNetTrainer.train_step to call optimizer.zero_grad() once "
                                                    f"per step (called {len(calls)} times)")


@contextlib.contextmanager
def seeded_augmenters(seeds_for: Callable[[int, int], list[int] | None]) -> Iterator[None]:
    """While the block runs, the augmenters ``nnUNetTrainer.get_dataloaders`` builds get seeds.

    nnU-Net constructs its augmenters (training first, then validation) inline: ``NonDetMultiThreadedAugmenter``
    with ``seeds=None``, so every worker seeds itself from the OS, or without workers (``nnUNet_n_proc_DA=0``)
    ``SingleThreadedAugmenter``, which draws from the trainer process's global random state; seeded trainers
    (``_s<S>``) need reproducible streams that nothing else in the process draws from. Inside the block only, the
    module's ``NonDetMultiThreadedAugmenter`` is replaced by a subclass that asks ``seeds_for(stream,
    num_processes)`` (stream 0, 1, ... in construction order, over both kinds) when it is given no seeds, and its
    ``SingleThreadedAugmenter`` by one that draws from its own random state seeded with ``seeds_for(stream, 1)[0]``
    (:func:`~nnunet_ext.data.random_streams.in_process_stream`). Precondition, checked: nnU-Net's trainer module
    uses batchgenerators' classes by those names.
    """
    from nnunet_ext.data.random_streams import in_process_stream

    original = getattr(nnunet_trainer_module, "NonDetMultiThreadedAugmenter", None)
    single = getattr(nnunet_trainer_module, "SingleThreadedAugmenter", None)
    if original is not NonDetMultiThreadedAugmenter or single is not SingleThreadedAugmenter:
        raise CompatibilityError("seeded_augmenters", "nnUNetTrainer.get_dataloaders to build batchgenerators' "
                                                      "NonDetMultiThreadedAugmenter and SingleThreadedAugmenter")
    streams = itertools.count()

    class SeededAugmenter(original):
        def __init__(self, data_loader, transform, num_processes, *args, seeds=None, **kwargs):
            stream = next(streams)
            super().__init__(data_loader, transform, num_processes, *args,
                             seeds=seeds if seeds is not None else seeds_for(stream, num_processes), **kwargs)

    def own_random_stream(data_loader, transform):
        return in_process_stream(data_loader, transform, seeds_for(next(streams), 1), single)

    nnunet_trainer_module.NonDetMultiThreadedAugmenter = SeededAugmenter
    nnunet_trainer_module.SingleThreadedAugmenter = own_random_stream
    try:
        yield
    finally:
        nnunet_trainer_module.NonDetMultiThreadedAugmenter = original
        nnunet_trainer_module.SingleThreadedAugmenter = single


class _TorchWith:
    """The ``torch`` module with some functions replaced (everything else is torch's own)."""

    def __init__(self, **replaced: Callable):
        self.__dict__.update(replaced)

    def __getattr__(self, name: str):
        return getattr(torch, name)


@contextlib.contextmanager
def _nnunet_trainer_torch(coupling: str, **replaced: Callable) -> Iterator[None]:
    """While the block runs, the ``torch`` that nnU-Net's trainer module sees has ``replaced`` functions."""
    if nnunet_trainer_module.__dict__.get("torch") is not torch:
        raise CompatibilityError(coupling, "nnunetv2.training.nnUNetTrainer.nnUNetTrainer to use the module torch")
    nnunet_trainer_module.torch = _TorchWith(**replaced)
    try:
        yield
    finally:
        nnunet_trainer_module.torch = torch


@contextlib.contextmanager
def captured_checkpoint_save() -> Iterator[list[dict]]:
    """While the block runs, ``nnUNetTrainer.save_checkpoint`` hands its checkpoint to the yielded list instead of
    writing it.

    nnU-Net builds the checkpoint dictionary inline and writes it with ``torch.save(checkpoint, filename)``; it has
    no hook to add entries. Multi-task trainers add their branch to nnU-Net's own dictionary (whatever keys a
    release adds) and write it once, atomically. Precondition, checked: one ``torch.save`` of a dictionary with
    ``network_weights`` (call the block only where nnU-Net writes: rank 0, checkpointing enabled).
    """
    saved = []
    with _nnunet_trainer_torch("captured_checkpoint_save", save=lambda obj, *args, **kwargs: saved.append(obj)):
        yield saved
    if len(saved) != 1 or not isinstance(saved[0], dict) or "network_weights" not in saved[0]:
        raise CompatibilityError("captured_checkpoint_save", f"nnUNetTrainer.save_checkpoint to torch.save one "
                                                             f"dictionary with 'network_weights' (saved {len(saved)})")


@contextlib.contextmanager
def captured_checkpoint_load(filename_or_checkpoint: str | dict,
                             check: Callable[[dict], None] | None = None) -> Iterator[list[dict]]:
    """While the block runs, the checkpoint ``nnUNetTrainer.load_checkpoint`` reads is also put into the yielded
    list (a dictionary argument is put there as it is); ``check``, when given, sees the checkpoint first (a file's
    on nnU-Net's read, a dictionary before the block runs), before nnU-Net restores anything from it (an exception
    it raises ends the load with nothing restored).

    nnU-Net reads the file with ``torch.load`` and keeps only what it restores; multi-task trainers restore their
    branch from the same dictionary instead of reading the file twice. (nnU-Net 2.8.1's ``load_checkpoint`` fails
    on a dictionary argument; its own callers pass file names.) Precondition, checked: a file name is read with
    exactly one ``torch.load``.
    """
    loaded = []

    def recording_load(*args, **kwargs):
        loaded.append(torch.load(*args, **kwargs))
        if check is not None:
            check(loaded[-1])
        return loaded[-1]

    if check is not None and isinstance(filename_or_checkpoint, dict):
        check(filename_or_checkpoint)
    with _nnunet_trainer_torch("captured_checkpoint_load", load=recording_load):
        yield loaded
    if isinstance(filename_or_checkpoint, dict):
        loaded[:] = [filename_or_checkpoint]
    elif len(loaded) != 1:
        raise CompatibilityError("captured_checkpoint_load", f"nnUNetTrainer.load_checkpoint to torch.load its file "
                                                             f"once (loaded {len(loaded)} times)")


def unwrap_network(network: nn.Module, expected: type[ModuleT]) -> ModuleT:
    """The ``expected`` module inside nnU-Net's DDP and ``torch.compile`` wrappers, unwrapped as
    ``nnUNetTrainer.save_checkpoint`` does: ``torch.compile`` returns a ``torch._dynamo.OptimizedModule`` (private
    API, no public name) holding the module in ``_orig_mod``. Precondition, checked: that gives ``expected``."""
    module = network.module if isinstance(network, DistributedDataParallel) else network
    module = module._orig_mod if isinstance(module, OptimizedModule) else module
    if not isinstance(module, expected):
        raise CompatibilityError("unwrap_network", f"a {expected.__name__} inside DDP / torch.compile's "
                                                   f"OptimizedModule (found {type(module).__name__})")
    return module


def save_preprocessed_case(preprocessor, output_filename_truncated: str, case: tuple, image_files: list[str],
                           plans_manager, configuration_manager, dataset_json: dict) -> None:
    """Write a preprocessed ``case`` (data, seg, properties) exactly as nnU-Net's preprocessor writes its cases.

    ``DefaultPreprocessor.run_case_save`` is ``self.run_case`` (read ``image_files``, then ``run_case_npy``)
    followed by the write: dtype casts, blosc2 chunks fitted to the patch size, the file format of nnU-Net's
    dataset class, which ``infer_dataset_class`` recognises. ``preprocess-unlabeled`` reads and checks the files
    itself, so ``run_case`` returns the case it already has and nnU-Net's write is kept, not copied.
    Precondition, checked: ``run_case_save`` calls ``self.run_case`` once and writes the properties file
    ``<output_filename_truncated>.pkl``.
    """
    def run_case(image_files, seg_file, plans_manager, configuration_manager, dataset_json):
        return case

    with _routed_once(preprocessor, "run_case", run_case, "save_preprocessed_case",
                      "DefaultPreprocessor.run_case_save to call self.run_case"):
        preprocessor.run_case_save(output_filename_truncated, image_files, None, plans_manager,
                                   configuration_manager, dataset_json)
    if not os.path.isfile(output_filename_truncated + ".pkl"):
        raise CompatibilityError("save_preprocessed_case", "DefaultPreprocessor.run_case_save to write the "
                                                           "properties file <case>.pkl")


@contextlib.contextmanager
def planning_n_proc_DA() -> Iterator[None]:
    """While the block runs, ``nnUNet_n_proc_DA=0`` reads as 1 (and says so); any other value is kept.

    ``nnUNet_n_proc_DA=0`` is valid for training (no augmentation workers, handy for debugging), but nnU-Net's
    ``ExperimentPlanner.static_estimate_VRAM_usage`` passes the same value to ``torch.set_num_threads``, which
    refuses 0. Planning only uses it as the thread count of that estimate, so 1 changes no plan. Precondition,
    asserted by the tests: the planner reads the variable when it plans.
    """
    if os.environ.get("nnUNet_n_proc_DA", "").strip() != "0":
        yield
        return
    print("[nnunet-ext] nnUNet_n_proc_DA=0: planning with 1 (nnU-Net's planner needs a positive thread count; "
          "training keeps 0)", flush=True)
    os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        yield
    finally:
        os.environ["nnUNet_n_proc_DA"] = "0"


_PRETRAINED_TARGETS: weakref.WeakKeyDictionary[nn.Module, tuple[Callable[[str], None], str | None]] = \
    weakref.WeakKeyDictionary()


def accept_pretrained_weights(network: nn.Module, log: Callable[[str], None], record_folder: str) -> None:
    """Make ``nnUNetv2_train -pretrained_weights`` load into ``network`` (an nnunet_ext trainer's) with
    :func:`nnunet_ext.pretrained.load_pretrained`, logging through ``log`` and recording every key in
    ``record_folder`` (the fold's folder, beside its checkpoints).

    ``nnunetv2.run.run_training.maybe_load_checkpoint`` calls the module's ``load_pretrained_weights(network,
    fname, verbose=True)`` after ``initialize``; it has no trainer hook and asserts that every tensor but the
    segmentation layers is in the file. Its module global is replaced, once, by a dispatcher that handles the
    networks registered here and hands every other network to nnU-Net's function unchanged. Precondition,
    checked: the module imports nnU-Net's ``load_pretrained_weights`` under that name.
    """
    import nnunetv2.run.run_training as run_training
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights as original

    current = getattr(run_training, "load_pretrained_weights", None)
    if current is not original and not getattr(current, "nnunet_ext_dispatch", False):
        raise CompatibilityError("accept_pretrained_weights", "nnunetv2.run.run_training to call "
                                                              "load_pretrained_weights(network, fname, verbose)")
    if current is original:
        @functools.wraps(original)
        def dispatch(network, fname, verbose=False):
            target = _PRETRAINED_TARGETS.get(network)
            if target is None:
                return original(network, fname, verbose=verbose)
            from nnunet_ext.pretrained import load_pretrained

            load_pretrained(unwrap_network(network, nn.Module), fname, *target)

        dispatch.nnunet_ext_dispatch = True
        run_training.load_pretrained_weights = dispatch
    _PRETRAINED_TARGETS[network] = (log, record_folder)
