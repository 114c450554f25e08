"""Batch streams that draw from their own random state, as seeded augmentation workers do.

With augmentation workers (``nnUNet_n_proc_DA`` > 0) every stream of a seeded trainer (``_s<S>``) crops and
augments in its own seeded processes. Without them (``nnUNet_n_proc_DA=0``, the CPU setting) nnU-Net's
``SingleThreadedAugmenter`` crops and augments in the trainer's process from the *global* random state, which
everything else in that process draws from too: a branch's initialisation, a VAE's sampling, a second (unlabeled)
stream. Then two trainers with the same seed would see different labeled batches, and a paired comparison of
two methods would also compare two augmentation draws. :class:`OwnRandomStream` gives such a stream its own
Python, NumPy and torch (CPU) states, seeded like its workers would be.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter


def random_states() -> tuple:
    """Python's, NumPy's and torch's (CPU) global random states."""
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def set_random_states(states: tuple) -> None:
    """Restore what :func:`random_states` returned."""
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


class OwnRandomStream:
    """An in-process batch stream (e.g. ``SingleThreadedAugmenter``) that draws from its own Python, NumPy and torch
    (CPU) random states, seeded with ``seed``, and leaves the global states as it found them on every batch.
    Other attributes are the wrapped stream's."""

    def __init__(self, stream, seed: int):
        self.stream = stream
        outside = random_states()
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's stays the trainer's
        self.states = random_states()
        set_random_states(outside)

    def __iter__(self):
        return self

    def __next__(self):
        outside = random_states()
        set_random_states(self.states)
        try:
            return next(self.stream)
        finally:
            self.states = random_states()
            set_random_states(outside)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["stream"], name)


def in_process_stream(data_loader, transform, seeds: list[int] | None,
                      single_threaded: Callable = SingleThreadedAugmenter):
    """The stream of one data loader without augmentation workers: ``single_threaded(data_loader, transform)``
    (batchgenerators' ``SingleThreadedAugmenter``), and for a seeded trainer (``seeds``: the seeds its workers would
    get) drawing from its own random state, seeded with the first worker's seed. The one place of that rule for
    nnU-Net's streams (``compat.seeded_augmenters``) and the unlabeled one (the semi-supervised trainers)."""
    stream = single_threaded(data_loader, transform)
    return stream if seeds is None else OwnRandomStream(stream, seeds[0])
