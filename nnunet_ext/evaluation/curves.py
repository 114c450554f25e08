"""Training curves of trained folds: nnU-Net's validation pseudo Dice per epoch, and whether it has levelled off.

nnU-Net logs, every epoch, the pseudo Dice of each class or region on its validation patches (``logging`` in the
checkpoint, drawn in ``progress.png``). A label-efficiency study must know whether its schedule let the baseline
finish learning: a regularizer that only delays learning looks harmful in a schedule that stops too early. So the
study reads each fold's curve and reports, per cell, the mean over the last fifth of training and its change
from the fifth before (``training_curves.md``), and draws every curve (``training_curves.png``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FINAL_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth")  # a finished fold has the first
FIFTH = 0.2  # the part of training whose pseudo Dice is compared with the part before it


@dataclass(frozen=True)
class Curve:
    """One fold's validation pseudo Dice: ``dice[epoch, i]`` of foreground class or region ``names[i]``."""

    model: str
    labels: int
    repeat: int
    fold: int
    names: tuple[str, ...]
    dice: np.ndarray

    @property
    def epochs(self) -> int:
        return len(self.dice)


def foreground_names(dataset_json: dict) -> list[str]:
    """The names of the classes or regions in the order nnU-Net's pseudo Dice lists them (its ``LabelManager``:
    regions in dataset.json order, labels by value; background and the ignore label left out)."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    manager = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    values = manager.foreground_regions if manager.has_regions else manager.foreground_labels

    def key(value):
        return tuple(value) if isinstance(value, (list, tuple)) else (value,)

    by_value = {key(v): name for name, v in dataset_json["labels"].items()}
    return [by_value[key(v)] for v in values]


def read_curve(fold_folder: str, names: Sequence[str], model: str, labels: int, repeat: int,
               fold: int) -> Curve | None:
    """The pseudo Dice curve logged in the fold's final (else latest) checkpoint; None without a checkpoint.
    Raises ``ValueError`` naming the checkpoint when its curve does not have one value per name and epoch."""
    import torch

    for name in FINAL_CHECKPOINTS:
        path = os.path.join(fold_folder, name)
        if os.path.isfile(path):
            break
    else:
        return None
    logging = torch.load(path, map_location="cpu", weights_only=False).get("logging", {})
    dice = np.asarray(logging.get("dice_per_class_or_region", []), dtype=float)
    if dice.ndim != 2 or dice.shape[1] != len(names):
        raise ValueError(f"{path}: the logged pseudo Dice has shape {dice.shape}, expected one value per epoch "
                         f"for each of {list(names)}")
    return Curve(model, labels, repeat, fold, tuple(names), dice)


def fifths(values: np.ndarray, fraction: float = FIFTH) -> tuple[np.ndarray, np.ndarray]:
    """The last ``fraction`` of an epoch axis and the same number of epochs before it (at least one each).
    Raises ``ValueError`` for fewer than two epochs."""
    if len(values) < 2:
        raise ValueError(f"a curve of {len(values)} epoch(s) has no last fifth to compare with the one before")
    n = min(max(1, int(round(len(values) * fraction))), len(values) // 2)
    return values[-n:], values[-2 * n:-n]


def plateau_rows(curves: Sequence[Curve], fraction: float = FIFTH) -> list[dict]:
    """Per curve and region (and their mean): the mean pseudo Dice over the last fifth and its change from the
    fifth before (NaN for a one-epoch run, which has nothing to compare). nnU-Net logs NaN for a region absent
    from every validation patch of an epoch; those epochs are left out of the means."""
    rows = []
    with warnings.catch_warnings():  # an all-NaN stretch is reported as NaN, not warned about
        warnings.simplefilter("ignore", RuntimeWarning)
        for curve in curves:
            columns = {**{n: curve.dice[:, i] for i, n in enumerate(curve.names)}, "mean": np.nanmean(curve.dice, 1)}
            for region, values in columns.items():
                last, before = fifths(values, fraction) if curve.epochs > 1 else (values, np.full(1, np.nan))
                rows.append({"model": curve.model, "labels": curve.labels, "repeat": curve.repeat,
                             "fold": curve.fold, "region": region, "epochs": curve.epochs,
                             "last_fifth": float(np.nanmean(last)),
                             "change": float(np.nanmean(last) - np.nanmean(before))})
    return rows


def _entry(row: dict) -> str:
    """``mean (change)`` with ``–`` for what could not be computed."""
    def number(value, sign=""):
        return "–" if np.isnan(value) else f"{value:{sign}.3f}"
    return f"{number(row['last_fifth'])} ({number(row['change'], '+')})"


def plateau_table(curves: Sequence[Curve], fraction: float = FIFTH) -> str:
    """Markdown: one line per fold, per region ``last-fifth mean (change from the fifth before)``."""
    if not curves:
        return ""
    rows = plateau_rows(curves, fraction)
    regions = list(dict.fromkeys(r["region"] for r in rows))
    lines = ["| model | labels | repeat | fold | epochs | " + " | ".join(regions) + " |",
             "|---|---|---|---|---|" + "---|" * len(regions)]
    by_fold: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_fold.setdefault((r["model"], r["labels"], r["repeat"], r["fold"], r["epochs"]), {})[r["region"]] = r
    for (model, labels, repeat, fold, epochs), cells in by_fold.items():
        values = [_entry(cells[g]) if g in cells else "" for g in regions]
        lines.append(f"| {model} | {labels} | {repeat} | {fold} | {epochs} | " + " | ".join(values) + " |")
    return ("Validation pseudo Dice (nnU-Net's, on validation patches) over the last fifth of training, and in "
            "brackets its change from the fifth before: near 0 where training has levelled off.\n\n"
            + "\n".join(lines) + "\n")


def plot_curves(curves: Sequence[Curve], path: str, fraction: float = FIFTH) -> str | None:
    """One panel per region and one for their mean, a line per fold coloured by model (line style by label
    budget), the last fifth shaded; None without curves."""
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves[0].names) + ["mean"]
    models = list(dict.fromkeys(c.model for c in curves))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    budgets = sorted({c.labels for c in curves})
    styles = {b: ("-", "--", ":", "-.")[i % 4] for i, b in enumerate(budgets)}
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for curve in curves:
            i = list(curve.names).index(name) if name in curve.names else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                values = curve.dice[:, i] if i is not None else np.nanmean(curve.dice, 1)
            ax.plot(np.arange(curve.epochs), values, color=colours[curve.model], ls=styles[curve.labels], lw=0.9,
                    alpha=0.8)
        longest = max(c.epochs for c in curves)
        if longest > 1:
            n = len(fifths(np.arange(longest), fraction)[0])
            ax.axvspan(longest - n - 0.5, longest - 0.5, color="0.9", zorder=0)
        ax.set(title=name, xlabel="epoch", ylim=(0, 1))
    axes[0][0].set_ylabel("validation pseudo Dice")
    for model in models:
        axes[0][-1].plot([], [], color=colours[model], label=model)
    for budget in budgets if len(budgets) > 1 else ():
        axes[0][-1].plot([], [], color="0.3", ls=styles[budget], label=f"{budget} labels")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
