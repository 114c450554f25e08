"""Seeded repeats (``_s<S>``): the grammar, the S-th labeled subset, seeded augmentation workers, and the
same loss curve twice for the same seed (and another one for another seed) through the real CLI."""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import pytest
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from conftest import run

from nnunet_ext.compat import CompatibilityError, seeded_augmenters
from nnunet_ext.data.budgets import DEFAULT_SEED, split_budget
from nnunet_ext.data.random_streams import OwnRandomStream, in_process_stream, random_states
from nnunet_ext.trainers.names import TrainerNameError, TrainerSpec, parse_trainer_name, trainer_class, trainer_name


@pytest.mark.parametrize("name, spec", [
    ("EncDecTrainer_s0", TrainerSpec("EncDecTrainer", seed=0)),
    ("EncDecTrainer_6labels_noMirroring_s12", TrainerSpec("EncDecTrainer", labels=6, mirroring=False, seed=12)),
    ("ssCPCSegTrainer_6labels_10unlabeled_2epochs_5iters_s1",
     TrainerSpec("ssCPCSegTrainer", labels=6, unlabeled=10, epochs=2, iters=5, seed=1)),
])
def test_seed_suffix_parses_and_round_trips(name, spec):
    assert parse_trainer_name(name) == spec and spec.name == name
    assert trainer_name(spec.base.removesuffix("Trainer"), spec.labels, spec.unlabeled, spec.epochs, spec.iters,
                        spec.mirroring, spec.seed) == name


@pytest.mark.parametrize("name, message", [
    ("EncDecTrainer_s01", "without leading zeros"),
    ("EncDecTrainer_s", "unknown suffix '_s'"),
    ("EncDecTrainer_sone", "unknown suffix"),
    ("EncDecTrainer_s1_noMirroring", "out of order"),
    ("EncDecTrainer_s1_s2", "repeated or out of order"),
])
def test_bad_seed_suffixes_say_what_is_wrong(name, message):
    with pytest.raises(TrainerNameError, match=message):
        parse_trainer_name(name)


def test_each_repeat_has_its_own_nested_labeled_subsets_and_s0_keeps_the_default():
    seeds = {s: object.__new__(trainer_class(f"EncDecTrainer_3labels{'' if s is None else f'_s{s}'}")).budget_seed
             for s in (None, 0, 1, 2)}
    assert seeds[None] == seeds[0] == DEFAULT_SEED and len({seeds[None], seeds[1], seeds[2]}) == 3
    cases = [f"C{i:02d}" for i in range(40)]
    subsets = {s: split_budget(cases, 6, None, seed)[0] for s, seed in seeds.items()}
    assert subsets[0] == subsets[None] and subsets[1] != subsets[0] and subsets[2] != subsets[1]
    assert split_budget(cases, 3, None, seeds[1])[0] == subsets[1][:3]  # nested within a repeat


def test_seeded_augmenters_give_each_stream_its_worker_seeds():
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as module

    asked = []

    def seeds_for(stream, processes):
        asked.append((stream, processes))
        return [100 * stream + i for i in range(processes)]

    with seeded_augmenters(seeds_for):
        assert module.NonDetMultiThreadedAugmenter is not NonDetMultiThreadedAugmenter
        train = module.NonDetMultiThreadedAugmenter(data_loader=[], transform=None, num_processes=2, seeds=None)
        val = module.NonDetMultiThreadedAugmenter(data_loader=[], transform=None, num_processes=1, seeds=None)
    assert module.NonDetMultiThreadedAugmenter is NonDetMultiThreadedAugmenter  # restored
    assert (train.seeds, val.seeds, asked) == ([0, 1], [100], [(0, 2), (1, 1)])

    asked.clear()  # without workers (nnUNet_n_proc_DA=0): each stream its own random state, seeded like a worker
    with seeded_augmenters(seeds_for):
        train, val = module.SingleThreadedAugmenter([], None), module.SingleThreadedAugmenter(data_loader=[],
                                                                                             transform=None)
    assert module.SingleThreadedAugmenter is SingleThreadedAugmenter  # restored
    assert isinstance(train, OwnRandomStream) and isinstance(train.stream, SingleThreadedAugmenter)
    assert asked == [(0, 1), (1, 1)]
    assert torch.equal(val.states[2], OwnRandomStream(None, 100).states[2])  # seeds_for(1, 1)[0]
    module.NonDetMultiThreadedAugmenter = object
    try:
        with pytest.raises(CompatibilityError, match="seeded_augmenters"), seeded_augmenters(seeds_for):
            pass
    finally:
        module.NonDetMultiThreadedAugmenter = NonDetMultiThreadedAugmenter


class Draws:
    """A stream whose every batch is one draw from Python's, NumPy's and torch's global random state."""

    answer = 42

    def __next__(self):
        return random.random(), float(np.random.rand()), float(torch.rand(1))


def same_states(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and all(np.array_equal(x, y) for x, y in zip(a[1], b[1])) and torch.equal(a[2], b[2])


def test_an_own_random_stream_draws_from_its_seed_alone_and_leaves_the_global_state_as_it_was():
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    before = random_states()
    stream = OwnRandomStream(Draws(), 7)
    first = [next(stream) for _ in range(3)]
    assert same_states(random_states(), before) and stream.answer == 42  # other attributes: the wrapped stream's
    again = OwnRandomStream(Draws(), 7)
    random.random(), np.random.rand(3), torch.rand(5)  # what a branch or a second stream would draw in between
    assert [next(again) for _ in range(3)] == first
    assert next(OwnRandomStream(Draws(), 8)) != first[0]  # negative control: another seed, other draws
    assert next(Draws()) not in first  # the global state itself went on from where it was


def test_an_in_process_stream_is_its_own_random_stream_only_when_seeded():
    unseeded = in_process_stream([], None, None)
    assert type(unseeded) is SingleThreadedAugmenter  # an unseeded trainer keeps nnU-Net's stream as it is
    stream = in_process_stream([], None, [5, 6])
    assert isinstance(stream, OwnRandomStream) and isinstance(stream.stream, SingleThreadedAugmenter)
    assert torch.equal(stream.states[2], OwnRandomStream(None, 5).states[2])  # the first worker's seed
    assert not torch.equal(stream.states[2], OwnRandomStream(None, 6).states[2])


def seeded(name: str, rank: int):
    """A trainer of ``name`` as DDP rank ``rank`` sees it (nothing built: seeds only)."""
    trainer = object.__new__(trainer_class(name))
    trainer.local_rank = rank
    return trainer


def test_rank_0_keeps_its_seeds_and_no_two_ranks_streams_or_workers_share_one():
    assert seeded("EncDecTrainer_s3", 0).augmenter_seeds(2, 3) == [3200, 3201, 3202]  # a single-GPU run's
    assert seeded("EncDecTrainer", 1).augmenter_seeds(0, 2) is None  # unseeded: nnU-Net's own workers
    # realistic values: 10 repeats on 8 GPUs, three streams of 16 workers each
    trainers = [seeded(f"EncDecTrainer_s{s}", rank) for s in range(10) for rank in range(8)]
    workers = [x for t in trainers for stream in range(3) for x in t.augmenter_seeds(stream, 16)]
    processes = [t.data_seed(t.trainer_spec.seed) for t in trainers]  # each rank's own process (ExtTrainer.__init__)
    assert len(set(workers)) == len(workers) and len(set(processes)) == len(processes)
    assert max(workers + processes) < 2 ** 32  # numpy's seed range
    assert [p for t, p in zip(trainers, processes, strict=True) if t.local_rank == 0] == list(range(10))


def final_checkpoint(ds: dict, trainer: str, env: dict, plans: str | None = None) -> dict:
    """Train fold 0 through the CLI, return its checkpoint_final.pth, and remove the run again."""
    plans = plans or ds["plans"]
    run(["nnUNetv2_train", str(ds["id"]), "3d_fullres", "0", "-p", plans, "-tr", trainer, "-device", "cpu"], env)
    folder = os.path.join(ds["results"], f"{trainer}__{plans}__3d_fullres")
    checkpoint = torch.load(os.path.join(folder, "fold_0", "checkpoint_final.pth"), map_location="cpu",
                            weights_only=False)
    shutil.rmtree(folder)
    return checkpoint


def losses_of(ds: dict, trainer: str, plans: str, env: dict) -> list[float]:
    """The per-epoch training and validation losses of a fresh fold-0 run (:func:`final_checkpoint`)."""
    logging = final_checkpoint(ds, trainer, env, plans)["logging"]
    return logging["train_losses"] + logging["val_losses"]


@pytest.mark.slow
@pytest.mark.parametrize("fixture, trainer", [
    ("tiny_dataset", "EncDecTrainer_3labels_2epochs_3iters_noMirroring"),
    # the unlabeled stream draws from the fold's training cases beyond the budget (seeded stream 2)
    ("tiny_dataset", "ssVAESegTrainer_3labels_2epochs_2iters_noMirroring"),
])
def test_same_seed_same_loss_curve_other_seed_another(request, fixture, trainer):
    """With one augmentation worker per stream (nnUNet_n_proc_DA=1) batches arrive in order, so the seeded
    workers make the run reproducible; another seed is the negative control."""
    ds = request.getfixturevalue(fixture)
    plans = ds.get("plans", "nnUNetCPUPlans")
    env = dict(ds["env"], nnUNet_n_proc_DA="1")
    first, again = (losses_of(ds, f"{trainer}_s1", plans, env) for _ in range(2))
    other = losses_of(ds, f"{trainer}_s2", plans, env)
    assert len(first) == 4 and first == again
    assert other != first


@pytest.mark.slow
def test_a_branch_that_adds_no_gradient_trains_exactly_like_encdec_on_the_same_seed(branch_dataset):
    """Without augmentation workers every stream crops and augments in the trainer's process, each from its own
    seeded random state, so neither the branch's initialisation nor the unlabeled stream changes EncDec's labeled
    batches: CPC with weight 0 (CPCSegZero, and ssCPCSegZero with its unlabeled stream) ends with EncDec's weights bit
    for bit, and a paired comparison differs by the method only. CPC with its weight does not (positive control)."""
    env = dict(branch_dataset["env"], nnUNet_n_proc_DA="0")
    weights = {base: final_checkpoint(branch_dataset, f"{base}_3labels_2epochs_3iters_noMirroring_s1", env)
               ["network_weights"]
               for base in ("EncDecTrainer", "CPCSegZeroTrainer", "ssCPCSegZeroTrainer", "CPCSegTrainer")}
    encdec = weights.pop("EncDecTrainer")
    for base, found in weights.items():
        same = found.keys() == encdec.keys() and all(torch.equal(found[k], encdec[k]) for k in encdec)
        assert same == (base != "CPCSegTrainer"), base
