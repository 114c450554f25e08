"""Seeded repeats under DDP: every rank draws its own labeled and unlabeled crops, and a rerun draws the same ones.

Two gloo processes build the real trainer as ``nnUNetv2_train`` does under DDP and draw batches through its
loaders with the single-threaded augmenter (``nnUNet_n_proc_DA=0``), which crops and augments in the trainer's
process with the seeds ``ExtTrainer`` sets; the worker seeds (``nnUNet_n_proc_DA>0``) are read from the same
trainers. There is no GPU here: nnU-Net sets ``cuda:<rank>`` under DDP, the test sets the device back to cpu.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY_DATASET_ID

TRAINER = "ssVAESegTrainer_3labels_noMirroring_s1"  # labeled stream 0 and unlabeled stream 2
DRAWS = 3


def draw(name: str) -> dict:
    """Build fold 0 of ``name`` in this DDP process and draw ``DRAWS`` labeled and unlabeled batches."""
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    trainer = get_trainer_from_args(str(TINY_DATASET_ID), "3d_fullres", 0, name, "nnUNetCPUPlans",
                                    device=torch.device("cpu"))
    trainer.device = torch.device("cpu")
    trainer._set_batch_size_and_oversample()  # nnU-Net's share of the batch per rank (what initialize does first)
    trainer.oversample_foreground_percent = 0.0  # the same crop rule on both ranks: only the seeds tell them apart
    trainer.dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    labeled, _ = trainer.get_dataloaders()
    return {"labeled": [next(labeled)["data"] for _ in range(DRAWS)],
            "unlabeled": [next(trainer.dataloader_unlabeled)["data"] for _ in range(DRAWS)],
            "worker_seeds": [trainer.augmenter_seeds(stream, 4) for stream in (0, 1, 2)]}


def _rank(rank: int, world: int, rendezvous: str, env: dict[str, str], out_dir: str) -> None:
    os.environ.update(env)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        runs = [draw(TRAINER) for _ in range(2)]  # the second: a rerun, built afresh as a restarted run is
        torch.save(runs, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_each_rank_draws_its_own_crops_and_a_rerun_the_same(tiny_dataset, tmp_path):
    env = {k: tiny_dataset["env"][k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    env.update(nnUNet_n_proc_DA="0", OMP_NUM_THREADS="1")
    mp.spawn(_rank, args=(2, str(tmp_path / "rendezvous"), env, str(tmp_path)), nprocs=2, join=True)
    (first, rerun), (other, _) = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for stream in ("labeled", "unlabeled"):
        assert all(torch.equal(a, b) for a, b in zip(first[stream], rerun[stream], strict=True)), stream
        assert not any(torch.equal(a, b) for a, b in zip(first[stream], other[stream], strict=True)), stream
    seed = 1  # _s1: rank 0 keeps the worker seeds of a single-GPU run
    assert first["worker_seeds"] == [[seed * 1000 + stream * 100 + i for i in range(4)] for stream in (0, 1, 2)]
    rank0, rank1 = ({s for seeds in run["worker_seeds"] for s in seeds} for run in (first, other))
    assert len(rank0) == len(rank1) == 12 and not rank0 & rank1
