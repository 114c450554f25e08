"""Every place where nnunet_ext relies on nnU-Net internals that nnU-Net does not offer as extension points.

Each coupling says which nnU-Net code it depends on and why, and checks its precondition so that an
nnU-Net release that changes the code fails loudly, naming the coupling, instead of training wrongly.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator

import nnunetv2
import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter


class CompatibilityError(RuntimeError):
    """nnU-Net no longer behaves as a coupling of nnunet_ext expects."""

    def __init__(self, coupling: str, expected: str):
        super().__init__(f"nnunet_ext coupling '{coupling}' expects {expected}, which nnunetv2 "
                         f"{getattr(nnunetv2, '__version__', '?')} does not do; nnunet_ext supports nnunetv2 2.8.x "
                         f"(see nnunet_ext/compat.py)")


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
    """While the block runs, the augmenters ``nnUNetTrainer.get_dataloaders`` builds get worker seeds.

    nnU-Net constructs its ``NonDetMultiThreadedAugmenter`` (training first, then validation) inline with
    ``seeds=None``, so every worker seeds itself from the OS; seeded trainers (``_s<S>``) need reproducible
    workers. The module's ``NonDetMultiThreadedAugmenter`` is replaced, inside the block only, by a subclass
    that asks ``seeds_for(stream, num_processes)`` (stream 0, 1, ... in construction order) when it is given
    no seeds. Precondition, checked: nnU-Net's trainer module uses batchgenerators' class by that name.
    """
    original = getattr(nnunet_trainer_module, "NonDetMultiThreadedAugmenter", None)
    if original is not NonDetMultiThreadedAugmenter:
        raise CompatibilityError("seeded_augmenters", "nnUNetTrainer.get_dataloaders to build batchgenerators' "
                                                      "NonDetMultiThreadedAugmenter")
    streams = itertools.count()

    class SeededAugmenter(original):
        def __init__(self, data_loader, transform, num_processes, *args, seeds=None, **kwargs):
            stream = next(streams)
            super().__init__(data_loader, transform, num_processes, *args,
                             seeds=seeds if seeds is not None else seeds_for(stream, num_processes), **kwargs)

    nnunet_trainer_module.NonDetMultiThreadedAugmenter = SeededAugmenter
    try:
        yield
    finally:
        nnunet_trainer_module.NonDetMultiThreadedAugmenter = original
