"""Study report: ``results.csv``, a Table-1-style markdown table and the Fig-2 / Fig-4 style plots.

Input is a list of :class:`ResultRow`, one per trained cell (trainer, label budget, unlabeled count,
fold ensemble) and evaluated region, holding the test-set mean Dice and HD95 (mm). Regions keep the
order in which they first appear (dataset.json order, as ``evaluate_folder`` reports them), except
that the BraTS regions are shown as ET, TC, WT like in the paper. Plots are drawn with matplotlib's
object API (``Figure`` + Agg canvas), so no display and no pyplot state are involved.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

# dataset.json region name -> the paper's abbreviation, in the paper's column order
BRATS_REGIONS = {"enhancing tumor": "ET", "tumor core": "TC", "whole tumor": "WT"}
CSV_COLUMNS = ("trainer", "model", "labels", "unlabeled", "folds", "region", "dice", "hd95_mm", "unlabeled_used")
FILES = {"csv": "results.csv", "table": "results.md", "fig2": "fig2_dice_vs_labels.png",
         "fig4": "fig4_dice_vs_unlabeled.png"}


@dataclass(frozen=True)
class ResultRow:
    """Test-set means of one region for one trained cell (``unlabeled`` None: no ``_unlabeled`` suffix).

    ``unlabeled_used``: how many unlabeled images each fold of a semi-supervised cell trained with
    (from its ``unlabeled_cases.json``), in fold order; empty for supervised cells.
    """

    trainer: str
    model: str
    labels: int
    unlabeled: int | None
    folds: tuple[int, ...]
    region: str
    dice: float
    hd95: float
    unlabeled_used: tuple[int, ...] = ()


def region_order(rows: Sequence[ResultRow]) -> list[str]:
    """Return the regions in first-appearance order, or ET, TC, WT for the BraTS regions."""
    regions = list(dict.fromkeys(r.region for r in rows))
    return list(BRATS_REGIONS) if set(regions) == set(BRATS_REGIONS) else regions


def region_label(region: str) -> str:
    """Return the short column label of a region (ET/TC/WT for BraTS, else the dataset.json name)."""
    return BRATS_REGIONS.get(region, region)


def write_csv(rows: Sequence[ResultRow], path: str) -> str:
    """Write one CSV line per row with :data:`CSV_COLUMNS` (folds and per-fold counts space-separated,
    None as empty)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in rows:
            writer.writerow([r.trainer, r.model, r.labels, "" if r.unlabeled is None else r.unlabeled,
                             " ".join(map(str, r.folds)), r.region, r.dice, r.hd95,
                             " ".join(map(str, r.unlabeled_used))])
    return path


def _cells(rows: Sequence[ResultRow]) -> dict[tuple, dict[str, ResultRow]]:
    """Group rows by cell (trainer, model, labels, unlabeled, folds) in first-appearance order."""
    cells: dict[tuple, dict[str, ResultRow]] = {}
    for r in rows:
        cells.setdefault((r.trainer, r.model, r.labels, r.unlabeled, r.folds), {})[r.region] = r
    return cells


def _number(value: float | None, digits: int) -> str:
    """Format a metric with ``digits`` decimals; a missing or NaN value as ``n/a``."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _unlabeled_cell(unlabeled: int | None, used: tuple[int, ...]) -> str:
    """The table's unlabeled entry: the asked count, ``all (N)`` (``all (N–M)`` across folds), or ``–``."""
    if unlabeled is not None:
        return str(unlabeled)
    if not used:
        return "–"
    low, high = min(used), max(used)
    return f"all ({low})" if low == high else f"all ({low}–{high})"


def markdown_table(rows: Sequence[ResultRow]) -> str:
    """Table 1 of the paper: one line per cell, Dice then HD95 (mm) per region."""
    regions = region_order(rows)
    head = ["model", "labels", "unlabeled", *(f"Dice {region_label(g)}" for g in regions),
            *(f"HD95 {region_label(g)} (mm)" for g in regions)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (_, model, labels, unlabeled, _), by_region in _cells(rows).items():
        found = [by_region.get(g) for g in regions]
        values = ([_number(r.dice if r else None, 4) for r in found]
                  + [_number(r.hd95 if r else None, 2) for r in found])
        used = next(iter(by_region.values())).unlabeled_used
        lines.append(f"| {model} | {labels} | {_unlabeled_cell(unlabeled, used)} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _plot_panels(series: dict[str, list[tuple[int, str, float]]], regions: list[str], xlabel: str,
                 title: str, path: str) -> str:
    """Draw one log-x panel per region, one line per series of (x, region, Dice) points; save a PNG."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig = Figure(figsize=(4.2 * len(regions), 3.8), layout="constrained")
    axes = fig.subplots(1, len(regions), squeeze=False)[0]
    xs = sorted({x for points in series.values() for x, _, _ in points})
    for ax, region in zip(axes, regions):
        for name, points in series.items():
            line = sorted((x, dice) for x, g, dice in points if g == region)
            ax.plot([x for x, _ in line], [d for _, d in line], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(title=region_label(region), xlabel=xlabel, ylabel="Dice")
        ax.grid(True, alpha=0.3)
    axes[-1].legend(fontsize="small")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    return path


def plot_dice_vs_labels(rows: Sequence[ResultRow], path: str) -> str:
    """Fig. 2: Dice vs number of labeled images, one line per model (and unlabeled count)."""
    series: dict[str, list[tuple[int, str, float]]] = {}
    for r in rows:
        name = r.model if r.unlabeled is None else f"{r.model} (+{r.unlabeled} unlabeled)"
        series.setdefault(name, []).append((r.labels, r.region, r.dice))
    return _plot_panels(series, region_order(rows), "number of labeled images",
                        "Test Dice vs number of labels", path)


def plot_dice_vs_unlabeled(rows: Sequence[ResultRow], path: str) -> str | None:
    """Fig. 4: Dice vs number of unlabeled images per (model, labels) with several counts; None if none."""
    series: dict[str, list[tuple[int, str, float]]] = {}
    for r in rows:
        if r.unlabeled is not None:
            series.setdefault(f"{r.model} ({r.labels} labels)", []).append((r.unlabeled, r.region, r.dice))
    series = {name: points for name, points in series.items() if len({x for x, _, _ in points}) > 1}
    if not series:
        return None
    return _plot_panels(series, region_order(rows), "number of unlabeled images",
                        "Test Dice vs number of unlabeled images", path)


def write_report(rows: Sequence[ResultRow], folder: str) -> dict[str, str]:
    """Write the CSV, the markdown table and the plots into ``folder``; return ``{kind: path}``."""
    if not rows:
        raise ValueError("no result rows to report")
    os.makedirs(folder, exist_ok=True)
    paths = {kind: os.path.join(folder, name) for kind, name in FILES.items()}
    write_csv(rows, paths["csv"])
    with open(paths["table"], "w") as f:
        f.write(markdown_table(rows) + "\n")
    plot_dice_vs_labels(rows, paths["fig2"])
    if plot_dice_vs_unlabeled(rows, paths["fig4"]) is None:
        if os.path.exists(paths["fig4"]):
            os.remove(paths["fig4"])  # a stale plot from an earlier grid would be misleading
        del paths["fig4"]
    return paths
