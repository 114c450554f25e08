"""What a regularization branch does to the shared encoder, per epoch, next to nnU-Net's ``progress.png``.

A branch trainer's total loss is nnU-Net's segmentation loss plus a weighted branch loss on the labeled batch
(and, for ss trainers, the branch loss of an unlabeled batch); all of them move the one encoder. Whether a
branch helps or crowds out the segmentation shows first in how hard each part pulls on the encoder, so the
monitor records, per epoch:

- ``encoder_grad_segmentation``, ``encoder_grad_branch``, ``encoder_grad_branch_unlabeled``: the L2 norm of the
  gradient each loss part, as applied (with its weight and ramp), puts on the encoder's parameters; the mean
  over ``probes`` probe steps spread evenly over the epoch. At a probe step the two labeled parts are
  differentiated separately (``torch.autograd.grad``, two extra partial backward passes); the unlabeled part is
  read off the gradients its own backward leaves, at no cost. Under AMP the losses are scaled like nnU-Net's
  before differentiating and the norms unscaled.
- ``branch_loss``, ``branch_loss_unlabeled``: the unweighted branch loss, mean over every step; ``chance``: the
  branch's chance level where it has one (CPC: ln of its candidates); ``vector_norm``/``vector_norm_unlabeled``:
  mean L2 norm of CPC's pooled sub-patch vectors (a collapse to constant vectors shows here first).
- ``weight``: the branch weight applied (the weight times the ramp and the pull cap, if any), mean over the epoch;
- ``pseudo_dice``: nnU-Net's validation pseudo Dice per class or region of that epoch.

``branch_monitor.json`` and ``branch_progress.png`` are rewritten in the fold folder at the end of every epoch; the
records ride in nnU-Net's checkpoint, so ``--c`` continues the curves exactly. Cost: ``benchmarks/monitor_cost.py``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from nnunet_ext.files import write_json_atomic

MONITOR_FILE = "branch_monitor.json"
MONITOR_PLOT = "branch_progress.png"
GRAD_KEYS = ("encoder_grad_segmentation", "encoder_grad_branch", "encoder_grad_branch_unlabeled")


def grad_norm(loss: torch.Tensor, params: Sequence[torch.Tensor], scale: float = 1.0) -> float:
    """L2 norm of d ``loss`` / d ``params`` (the graph is kept for the real backward); ``scale`` multiplies the loss
    before differentiating and divides the norm after (AMP's loss scale, so fp16 gradients do not underflow)."""
    grads = torch.autograd.grad(loss * scale, list(params), retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None) + 0.0)) / scale


def accumulated_grad_norm(params: Sequence[torch.Tensor], scale: float = 1.0) -> float:
    """L2 norm of the gradients accumulated in ``params`` (``.grad``), divided by ``scale``."""
    total = sum(float((p.grad.float() ** 2).sum()) for p in params if p.grad is not None)
    return math.sqrt(total) / scale


class BranchMonitor:
    """Per-epoch records of a branch trainer (see the module docstring).

    ``probes``: probe steps per epoch (0: no gradient norms, the per-step values are still recorded). Call
    :meth:`is_probe` with the iteration in the epoch, :meth:`add` with a step's values, :meth:`end_epoch` once
    validation has run; :meth:`state_dict` / :meth:`load_state_dict` for the checkpoint.
    """

    def __init__(self, iterations_per_epoch: int, probes: int):
        self.probes = max(0, min(int(probes), iterations_per_epoch))
        self.every = math.ceil(iterations_per_epoch / self.probes) if self.probes else 0
        self.records: list[dict] = []
        self._epoch: dict[str, list[float]] = {}

    def is_probe(self, iteration: int) -> bool:
        """Whether the ``iteration``-th step of an epoch (0-based) measures gradient norms."""
        return self.probes > 0 and iteration % self.every == 0

    def add(self, **values: float | None) -> None:
        """Values of one step (None: not measured at this step)."""
        for key, value in values.items():
            if value is not None:
                self._epoch.setdefault(key, []).append(float(value))

    def end_epoch(self, epoch: int, pseudo_dice: Sequence[float] | None) -> dict:
        """Close ``epoch``: means of its values, plus nnU-Net's pseudo Dice; returns the record (replaces a record of
        the same epoch, e.g. after ``--c`` resumed from an earlier checkpoint)."""
        record: dict = {"epoch": int(epoch)}
        for key, values in self._epoch.items():
            record[key] = float(np.mean(values))
            if key in GRAD_KEYS:
                record[f"{key}_probes"] = len(values)
        if pseudo_dice is not None:
            record["pseudo_dice"] = [float(v) for v in np.atleast_1d(pseudo_dice)]
        self._epoch = {}
        self.records = [r for r in self.records if r["epoch"] < epoch] + [record]
        return record

    def summary(self, record: dict) -> str:
        """One log line of a record."""
        parts = [f"{k.removeprefix('encoder_grad_')} {record[k]:.3g}" for k in GRAD_KEYS if k in record]
        grads = f"encoder gradient norm: {', '.join(parts)}; " if parts else ""
        names = {"branch_loss": "unweighted branch loss", "branch_loss_unlabeled": "on unlabeled images",
                 "chance": "chance", "vector_norm": "vector norm", "weight": "applied weight"}
        values = [f"{name} {record[k]:.4f}" for k, name in names.items() if k in record]
        return f"branch monitor: {grads}{', '.join(values)}"

    def state_dict(self) -> dict:
        """The records so far (for the checkpoint)."""
        return {"records": [dict(r) for r in self.records]}

    def load_state_dict(self, state: dict) -> None:
        """Records of a checkpoint; values of an unfinished epoch are dropped."""
        self.records = [dict(r) for r in state["records"]]
        self._epoch = {}

    def write(self, folder: str, meta: dict) -> None:
        """``branch_monitor.json`` (atomically) and ``branch_progress.png`` in ``folder``."""
        write_json_atomic(os.path.join(folder, MONITOR_FILE),
                          {**meta, "probes_per_epoch": self.probes, "epochs": self.records})
        plot_records(self.records, os.path.join(folder, MONITOR_PLOT), meta.get("title", ""), meta.get("names", ()))


def plot_records(records: Sequence[dict], filename: str, title: str = "", names: Sequence[str] = ()) -> None:
    """Four panels over the epochs: encoder gradient norms (log scale), branch loss and chance, the applied weight
    and vector norms, and nnU-Net's pseudo Dice per class or region (labelled with ``names`` where given)."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    if not records:
        return
    epochs = [r["epoch"] for r in records]

    def series(key):
        return [r.get(key, np.nan) for r in records]

    # matplotlib's own style: nnU-Net's progress plot sets seaborn's 2.5x fonts for the whole process
    with plt.style.context("default"):
        fig, axes = plt.subplots(4, 1, figsize=(9, 12), sharex=True)
        for key, style in zip(GRAD_KEYS, ("k-", "r-", "m--"), strict=True):
            if any(key in r for r in records):
                axes[0].plot(epochs, series(key), style, label=key.removeprefix("encoder_grad_"))
        axes[0].set_yscale("log")
        axes[0].set_ylabel("encoder gradient norm")
        for key, style in (("branch_loss", "r-"), ("branch_loss_unlabeled", "m--"), ("chance", "k:")):
            if any(key in r for r in records):
                axes[1].plot(epochs, series(key), style, label=key)
        axes[1].set_ylabel("branch loss (unweighted)")
        axes[2].plot(epochs, series("weight"), "b-", label="applied weight")
        axes[2].set_ylabel("branch weight")
        if any("vector_norm" in r for r in records):
            twin = axes[2].twinx()
            twin.plot(epochs, series("vector_norm"), "g-", label="vector norm")
            if any("vector_norm_unlabeled" in r for r in records):
                twin.plot(epochs, series("vector_norm_unlabeled"), "g--", label="vector norm (unlabeled)")
            twin.set_ylabel("pooled vector norm")
            twin.legend(loc="lower right")
        dice = [r.get("pseudo_dice") for r in records]
        n = max((len(d) for d in dice if d), default=0)
        for i in range(n):
            name = names[i] if i < len(names) else f"{i + 1}"
            axes[3].plot(epochs, [d[i] if d and i < len(d) else np.nan for d in dice], label=f"pseudo Dice {name}")
        axes[3].set_ylabel("validation pseudo Dice")
        axes[3].set_xlabel("epoch")
        for ax in axes:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="upper left", fontsize="small")
        if title:
            axes[0].set_title(title, fontsize="medium")
        fig.tight_layout()
        fig.savefig(filename, dpi=80)
        plt.close(fig)
