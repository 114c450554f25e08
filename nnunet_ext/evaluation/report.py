"""Study report: ``results.csv``, Table 1 and paired differences in ``results.md``, Fig. 2 / Fig. 4 / paired plots.

Input is a list of :class:`CaseResult`: Dice and HD95 (mm) of one test case and region, predicted by the
fold ensemble of one repeat of one trained cell, under one empty-mask policy (``brats`` or ``nan``, see
``metrics``), and the optional metrics of summaries evaluated with ``--metrics`` (lesion-wise Dice and HD95, NSD,
HD95 with surfels; :data:`OPTIONAL_METRICS`). An optional metric that some result holds joins the CSV, Table 1
and the paired tables (and so their Holm families); without them every output is as before. A cell is (model,
label budget, unlabeled count, folds); its repeats (seed K = 0..R−1, each with its own labeled subset) are told
apart by ``repeat`` and may have different trainer names. From it:

- ``results.csv``: one :class:`ResultRow` per cell × repeat × policy × region, the mean over the test cases.
- ``results.md``: per policy, Table 1 (mean ± sample std over the repeats of those means, the std only with
  more than one repeat, and the plans and norm the cell trained with) and, per label budget, the paired
  differences of every other model to the baseline model at the same budget (see ``statistics``).
- ``paired_differences.csv``: those paired differences, one line per policy × budget × model × region × metric,
  with the unadjusted interval, the raw and the Holm-adjusted p and the star.
- ``cases.csv``: the input itself, one :class:`CaseResult` per line (``results.csv``'s columns plus ``case``), so
  that the report can be made again, or from the cases of several runs together (:func:`read_cases_csv`,
  ``nnunet-ext report``), without the predictions or the checkpoints.
- Fig. 2 (Dice vs labels), Fig. 4 (Dice vs unlabeled count), each a mean line with a ± std band over the
  repeats, and the per-case paired plot (ΔDice per test case with the interval and star of its table); all for
  the first policy present in ``EMPTY_POLICIES`` order (BraTS before nnU-Net's).

One paired table (one policy, one label budget) is one family of comparisons: every model × region × metric
(Dice, HD95) with at least ``MIN_CASES`` test cases. Holm's correction runs over that family, and a star needs an
interval that excludes 0 and a Holm-adjusted Wilcoxon p below ``ALPHA``. With fewer cases a comparison shows its
mean and ``n too small``, never an interval or a star, in the table, the CSV and the plot alike.

Means leave NaN values out (nnU-Net's policy). Regions keep the order in which they first appear (dataset.json
order, as ``evaluate_folder`` reports them), except that the BraTS regions are shown as ET, TC, WT like in
the paper. Plots are drawn with matplotlib's object API (``Figure`` + Agg canvas), so no display and no
pyplot state are involved.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from nnunet_ext.evaluation.metrics import EMPTY_POLICIES, EMPTY_POLICY_DESCRIPTIONS, check_policy
from nnunet_ext.evaluation.statistics import (
    ALPHA,
    COLLAPSE_RATIO,
    CONFIDENCE,
    MIN_CASES,
    N_RESAMPLES,
    SEED,
    PairedComparison,
    case_means,
    compare,
    holm_family,
    mean_and_std,
    paired_differences,
    starred,
    worst_repeat_ratio,
)
from nnunet_ext.files import atomic_text, write_text_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# dataset.json region name -> the paper's abbreviation, in the paper's column order
BRATS_REGIONS = {"enhancing tumor": "ET", "tumor core": "TC", "whole tumor": "WT"}
POLICY_TITLES = {"brats": "BraTS convention", "nan": "nnU-Net convention"}
CSV_COLUMNS = ("trainer", "model", "labels", "unlabeled", "folds", "repeat", "region", "policy", "dice", "hd95_mm",
               "unlabeled_used", "plans", "norm")
PAIRED_CSV_COLUMNS = ("policy", "labels", "model", "unlabeled", "region", "metric", "repeats", "pairs", "cases",
                      "mean", "low", "high", "n_too_small", "p", "p_holm", "star")
FILES = {"csv": "results.csv", "cases_csv": "cases.csv", "table": "results.md", "paired_csv": "paired_differences.csv",
         "fig2": "fig2_dice_vs_labels.png", "fig4": "fig4_dice_vs_unlabeled.png", "paired": "fig_paired_dice.png"}
BASELINE = "EncDec"
# metric of the paired tables -> decimals shown
METRIC_DIGITS = {"dice": 4, "hd95": 2, "lesion_dice": 4, "lesion_hd95": 2, "nsd": 4, "hd95_surfels": 2}
# metrics that only summaries evaluated with ``--metrics`` hold: CaseResult field -> (summary key, CSV column)
OPTIONAL_METRICS = {"lesion_dice": ("LesionDice", "lesion_dice"), "lesion_hd95": ("LesionHD95", "lesion_hd95_mm"),
                    "nsd": ("NSD", "nsd"), "hd95_surfels": ("HD95_surfels", "hd95_surfels_mm")}
# metric -> its name in table headings
METRIC_NAMES = {"dice": "Dice", "hd95": "HD95", "lesion_dice": "lesion-wise Dice", "lesion_hd95": "lesion-wise HD95",
                "nsd": "NSD", "hd95_surfels": "HD95 surfels"}


@dataclass(frozen=True)
class ResultRow:
    """Dice, HD95 (mm) and the optional metrics of one region for one repeat of a cell under one empty-mask policy:
    the test-set means (NaN left out), one line of ``results.csv``; a :class:`CaseResult` holds one test case's.

    ``unlabeled`` None: no ``_unlabeled`` suffix. ``unlabeled_used``: how many unlabeled images each fold
    of a semi-supervised repeat trained with (from its ``unlabeled_cases.json``), in fold order; empty for
    supervised cells. ``plans``, ``norm``: the plans name and the norm's class name the repeat's network was
    built with (from its result folder's ``plans.json``; CPC trainers train a GroupNorm copy); empty when unknown.
    """

    trainer: str
    model: str
    labels: int
    unlabeled: int | None
    folds: tuple[int, ...]
    repeat: int
    region: str
    policy: str
    dice: float
    hd95: float
    unlabeled_used: tuple[int, ...] = ()
    plans: str = ""
    norm: str = ""
    lesion_dice: float = math.nan
    lesion_hd95: float = math.nan
    nsd: float = math.nan
    hd95_surfels: float = math.nan


@dataclass(frozen=True)
class CaseResult(ResultRow):
    """The values of one test case (``case``, given by keyword) in one region, for one repeat of a cell, under one
    empty-mask policy; the fields as in :class:`ResultRow`."""

    case: str = field(kw_only=True)


def summary_case_results(summary: dict, trainer: str, model: str, labels: int, unlabeled: int | None,
                         folds: Sequence[int], repeat: int = 0, unlabeled_used: Sequence[int] = (), plans: str = "",
                         norm: str = "") -> list[CaseResult]:
    """The :class:`CaseResult` of every test case and region in one ``evaluate_folder`` summary (its policy); a
    metric the JSON wrote as null (NaN), or that the summary lacks (:data:`OPTIONAL_METRICS`), is NaN."""
    def value(v: float | None) -> float:
        return math.nan if v is None else float(v)

    policy = summary["conventions"]["empty_policy"]
    return [CaseResult(trainer, model, labels, unlabeled, tuple(folds), repeat, region, policy,
                       value(m["Dice"]), value(m["HD95"]), tuple(unlabeled_used), plans, norm, case=c["case"],
                       **{name: value(m.get(key)) for name, (key, _) in OPTIONAL_METRICS.items()})
            for c in summary["metric_per_case"] for region, m in c["metrics"].items()]


class CellKey(NamedTuple):
    """A trained grid cell, whatever its repeats."""

    model: str
    labels: int
    unlabeled: int | None
    folds: tuple[int, ...]


@dataclass(frozen=True)
class Pairing:
    """A model's cell, its baseline cell at the same budget and folds, the repeats both have, or why none."""

    method: CellKey
    baseline: CellKey | None
    repeats: tuple[int, ...]
    missing: str = ""


@dataclass(frozen=True)
class PairedRow:
    """One comparison of a paired table: a model's cell minus its baseline in one region and metric, under one
    policy, with the Holm-adjusted p of its table (NaN when it has too few cases)."""

    pairing: Pairing
    policy: str
    region: str
    metric: str
    result: PairedComparison
    p_holm: float

    @property
    def starred(self) -> bool:
        """Whether the interval excludes 0 and the Holm-adjusted p is below ``ALPHA``."""
        return starred(self.result, self.p_holm)


# (cell, repeat, policy, region) -> {case: result}
Index = dict[tuple[CellKey, int, str, str], dict[str, CaseResult]]


def cell_of(result: CaseResult | ResultRow) -> CellKey:
    """Return the cell a result belongs to."""
    return CellKey(result.model, result.labels, result.unlabeled, result.folds)


def region_order(results: Sequence[CaseResult | ResultRow]) -> list[str]:
    """Return the regions in first-appearance order, or ET, TC, WT for the BraTS regions."""
    regions = list(dict.fromkeys(r.region for r in results))
    return list(BRATS_REGIONS) if set(regions) == set(BRATS_REGIONS) else regions


def region_label(region: str) -> str:
    """Return the short column label of a region (ET/TC/WT for BraTS, else the dataset.json name)."""
    return BRATS_REGIONS.get(region, region)


def policy_order(results: Sequence[CaseResult | ResultRow]) -> list[str]:
    """Return the empty-mask policies present, in ``EMPTY_POLICIES`` order."""
    present = {r.policy for r in results}
    return [p for p in EMPTY_POLICIES if p in present]


def metrics_present(results: Sequence[CaseResult | ResultRow]) -> list[str]:
    """Dice, HD95, then the optional metrics that some result holds (not NaN), in :data:`METRIC_DIGITS` order."""
    return ["dice", "hd95", *(m for m in OPTIONAL_METRICS if any(not math.isnan(getattr(r, m)) for r in results))]


def index_cases(cases: Sequence[CaseResult]) -> Index:
    """Group the results by cell, repeat, policy and region, then case; refuse unknown policies and duplicates."""
    index: Index = {}
    for r in cases:
        check_policy(r.policy)
        by_case = index.setdefault((cell_of(r), r.repeat, r.policy, r.region), {})
        if r.case in by_case:
            raise ValueError(f"two results for case {r.case!r}, region {r.region!r}, policy {r.policy!r} in "
                             f"repeat {r.repeat} of {r.trainer}")
        by_case[r.case] = r
    return index


def result_rows(cases: Sequence[CaseResult]) -> list[ResultRow]:
    """Average the test cases of every cell × repeat × policy × region into one row, in that order."""
    index = index_cases(cases)
    cells = {c: i for i, c in enumerate(dict.fromkeys(map(cell_of, cases)))}
    regions = {g: i for i, g in enumerate(region_order(cases))}
    keys = sorted(index, key=lambda k: (cells[k[0]], k[1], EMPTY_POLICIES.index(k[2]), regions[k[3]]))
    rows = []
    for cell, repeat, policy, region in keys:
        results = list(index[cell, repeat, policy, region].values())
        means = {m: mean_and_std([getattr(r, m) for r in results])[0] for m in METRIC_DIGITS}
        first = results[0]
        rows.append(ResultRow(first.trainer, *cell, repeat, region, policy, unlabeled_used=first.unlabeled_used,
                              plans=first.plans, norm=first.norm, **means))
    return rows


def write_csv(rows: Sequence[ResultRow], path: str) -> str:
    """Write one CSV line per row with :data:`CSV_COLUMNS` (then ``case`` for :class:`CaseResult` rows), then a
    column per optional metric present (folds and per-fold counts space-separated, None and unknown plans as
    empty). Floats are written with ``repr``, so :func:`read_cases_csv` reads back the same values."""
    optional = metrics_present(rows)[2:]
    cases = bool(rows) and all(isinstance(r, CaseResult) for r in rows)
    with atomic_text(path) as f:
        writer = csv.writer(f)
        writer.writerow([*CSV_COLUMNS, *(["case"] if cases else []), *(OPTIONAL_METRICS[m][1] for m in optional)])
        for r in rows:
            writer.writerow([r.trainer, r.model, r.labels, "" if r.unlabeled is None else r.unlabeled,
                             " ".join(map(str, r.folds)), r.repeat, r.region, r.policy, r.dice, r.hd95,
                             " ".join(map(str, r.unlabeled_used)), r.plans, r.norm, *([r.case] if cases else []),
                             *(getattr(r, m) for m in optional)])
    return path


def read_cases_csv(path: str) -> list[CaseResult]:
    """The :class:`CaseResult` rows of a ``cases.csv`` that :func:`write_report` wrote; a file without a ``case``
    column (a ``results.csv`` of means) or with a malformed value is refused, naming the file and line."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in (*CSV_COLUMNS, "case") if c not in header]
        if missing:
            kind = " (a results.csv holds means over the test cases, not cases)" if missing == ["case"] else ""
            raise ValueError(f"{path}: not a cases.csv of nnunet-ext study: no column {', '.join(missing)}{kind}")
        columns = {column: name for name, (_, column) in OPTIONAL_METRICS.items()}
        cases = []
        for line, row in enumerate(reader, start=2):
            try:
                cases.append(CaseResult(
                    row["trainer"], row["model"], int(row["labels"]),
                    int(row["unlabeled"]) if row["unlabeled"] else None, tuple(map(int, row["folds"].split())),
                    int(row["repeat"]), row["region"], row["policy"], float(row["dice"]), float(row["hd95_mm"]),
                    tuple(map(int, row["unlabeled_used"].split())), row["plans"], row["norm"], case=row["case"],
                    **{name: float(row[column]) for column, name in columns.items() if column in header}))
            except (TypeError, ValueError) as error:
                raise ValueError(f"{path}, line {line}: {error}") from None
    return cases


def _number(value: float | None, digits: int) -> str:
    """Format a metric with ``digits`` decimals; a missing or NaN value as ``n/a``."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _mean_std(values: Sequence[float], digits: int) -> str:
    """Format the mean ± sample std of per-repeat values (the std only with more than one non-NaN value)."""
    mean, std, _ = mean_and_std(values)
    return _number(mean, digits) if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _unlabeled_cell(unlabeled: int | None, used: Sequence[int]) -> str:
    """The table's unlabeled entry: the asked count, ``all (N)`` (``all (N–M)`` across folds), or ``–``."""
    if unlabeled is not None:
        return str(unlabeled)
    if not used:
        return "–"
    low, high = min(used), max(used)
    return f"all ({low})" if low == high else f"all ({low}–{high})"


def _plans_cell(rows: Sequence[ResultRow]) -> str:
    """The table's plans entry of a cell: ``plans (norm)`` as its repeats trained (several when they differ), or
    ``–`` when unknown."""
    return ", ".join(dict.fromkeys(f"{r.plans} ({r.norm})" for r in rows if r.plans)) or "–"


def _unlabeled_used(results: Sequence[CaseResult | ResultRow]) -> dict[CellKey, tuple[int, ...]]:
    """Return per cell the unlabeled counts of all its repeats' folds."""
    per_repeat = {(cell_of(r), r.repeat): r.unlabeled_used for r in results}
    used: dict[CellKey, tuple[int, ...]] = {}
    for (cell, _), counts in per_repeat.items():
        used[cell] = used.get(cell, ()) + counts
    return used


def markdown_table(cases: Sequence[CaseResult], policy: str = "brats") -> str:
    """Table 1 of the paper under one policy: per cell Dice then HD95 (mm) per region (then any optional metric),
    mean ± std over repeats, then the number of repeats and the plans (norm) the cell trained with."""
    rows = [r for r in result_rows(cases) if r.policy == policy]
    regions, metrics = region_order(cases), metrics_present(cases)
    head = ["model", "labels", "unlabeled",
            *(f"{METRIC_NAMES[m]} {region_label(g)}{' (mm)' if 'hd95' in m else ''}" for m in metrics for g in regions),
            "repeats", "plans (norm)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    used = _unlabeled_used(rows)
    for cell in dict.fromkeys(map(cell_of, rows)):
        cell_rows = [r for r in rows if cell_of(r) == cell]
        values = [_mean_std([getattr(r, m) for r in cell_rows if r.region == g], METRIC_DIGITS[m])
                  for m in metrics for g in regions]
        repeats = len({r.repeat for r in cell_rows})
        lines.append(f"| {cell.model} | {cell.labels} | {_unlabeled_cell(cell.unlabeled, used[cell])} | "
                     + " | ".join(values) + f" | {repeats} | {_plans_cell(cell_rows)} |")
    return "\n".join(lines)


def pairings(index: Index, baseline: str = BASELINE) -> list[Pairing]:
    """Pair every cell of another model with the cell of ``baseline`` at the same label budget and folds."""
    cells = list(dict.fromkeys(k[0] for k in index))
    repeats = {c: {k[1] for k in index if k[0] == c} for c in cells}
    result = []
    for cell in sorted((c for c in cells if c.model != baseline), key=lambda c: c.labels):
        found = [c for c in cells if c.model == baseline and (c.labels, c.folds) == (cell.labels, cell.folds)]
        common = tuple(sorted(repeats[cell] & repeats[found[0]])) if len(found) == 1 else ()
        if not found:
            missing = f"no {baseline} at {cell.labels} labels"
        elif len(found) > 1:
            missing = f"{len(found)} {baseline} cells at {cell.labels} labels, no unique baseline"
        elif not common:
            missing = (f"no {baseline} repeat matches repeats {' '.join(map(str, sorted(repeats[cell])))} "
                       f"({baseline} has {' '.join(map(str, sorted(repeats[found[0]])))})")
        else:
            missing = ""
        result.append(Pairing(cell, found[0] if len(found) == 1 else None, common, missing))
    return result


def paired_values(index: Index, pairing: Pairing, policy: str, region: str,
                  metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Return a metric (``dice``/``hd95``) of model and baseline as (repeats, cases) arrays; NaN where absent."""
    sides = [[index.get((cell, k, policy, region), {}) for k in pairing.repeats]
             for cell in (pairing.method, pairing.baseline)]
    cases = sorted({c for side in sides for by_case in side for c in by_case})
    shape = (len(pairing.repeats), len(cases))
    return tuple(np.array([[getattr(by_case[c], metric) if c in by_case else math.nan for c in cases]
                           for by_case in side], dtype=float).reshape(shape) for side in sides)


def paired_rows(cases: Sequence[CaseResult], policy: str = "brats", baseline: str = BASELINE) -> list[PairedRow]:
    """Compare every paired cell with ``baseline`` per region and metric; Holm over each label budget's rows."""
    index = index_cases(cases)
    found = [p for p in pairings(index, baseline) if not p.missing]
    rows = []
    for budget in dict.fromkeys(p.method.labels for p in found):
        compared = [(pairing, region, metric, compare(*paired_values(index, pairing, policy, region, metric)))
                    for pairing in found if pairing.method.labels == budget
                    for region in region_order(cases) for metric in metrics_present(cases)]
        adjusted = holm_family([result for *_, result in compared])
        rows += [PairedRow(pairing, policy, region, metric, result, float(p))
                 for (pairing, region, metric, result), p in zip(compared, adjusted)]
    return rows


def _interval(row: PairedRow) -> str:
    """Format mean [low, high] with signs, marked ``*`` when starred; the mean and ``n too small`` below the
    minimum of cases."""
    result, digits = row.result, METRIC_DIGITS[row.metric]
    if math.isnan(result.mean):
        return "n/a"
    if result.too_few_cases:
        return f"{result.mean:+.{digits}f} (n too small)"
    text = f"{result.mean:+.{digits}f} [{result.low:+.{digits}f}, {result.high:+.{digits}f}]"
    return text + " *" if row.starred else text


def _p_value(p: float) -> str:
    """Format a p-value with 4 decimals, below 0.0001 as ``<0.0001``."""
    return "n/a" if math.isnan(p) else "<0.0001" if p < 1e-4 else f"{p:.4f}"


def _budget_heading(budget: int, budget_pairings: Sequence[Pairing]) -> str:
    """The heading of a budget's paired table; it says when intervals cover test cases only (one repeat)."""
    single = [p for p in budget_pairings if len(p.repeats) == 1]
    if not single:
        return f"#### {budget} labels"
    rows = "one repeat" if len(single) == len(budget_pairings) else "rows with 1 repeat"
    return (f"#### {budget} labels ({rows}: the interval covers the spread between test cases only, not between "
            "training runs)")


def _family_note(rows: Sequence[PairedRow], baseline: str) -> str:
    """The line under a budget's table: the size of its Holm family and how many intervals exclude 0 by chance."""
    tested = [r for r in rows if not math.isnan(r.p_holm)]
    if not tested:
        return f"No comparison in this table has {MIN_CASES} or more test cases: no interval, no star."
    excluding = sum(r.result.excludes_zero for r in tested)
    return (f"Holm over the {len(tested)} comparisons of this table with intervals; {excluding} of their unadjusted "
            f"intervals exclude 0, where about {len(tested) * ALPHA:.1f} would by chance alone if no model differed "
            f"from {baseline}.")


def _worst_repeat(method: np.ndarray, baseline: np.ndarray, repeats: Sequence[int]) -> str:
    """``ratio (repeat k)`` of :func:`worst_repeat_ratio`, ``!`` below 0.5; ``–`` without a ratio."""
    ratio, index = worst_repeat_ratio(method, baseline)
    if math.isnan(ratio):
        return "–"
    return f"{ratio:.2f} (repeat {repeats[index]}){' !' if ratio < COLLAPSE_RATIO else ''}"


def paired_tables(cases: Sequence[CaseResult], policy: str = "brats", baseline: str = BASELINE) -> str:
    """Per label budget, the paired differences of every other model's cells to ``baseline`` under one policy."""
    index = index_cases(cases)
    if not any(k[0].model == baseline for k in index):
        return f"No {baseline} cells, so no paired differences (choose the baseline model with --baseline)."
    used, confidence, metrics = _unlabeled_used(cases), f"{CONFIDENCE:.0%}", metrics_present(cases)
    head = ["model", "unlabeled", "region", "repeats"]
    for m in metrics:
        name = METRIC_NAMES[m]
        head += [f"Δ{name}{' (mm)' if 'hd95' in m else ''} [{confidence} CI]", f"{name} pairs", f"{name} p",
                 f"{name} p Holm"]
    head.append(f"Dice ÷ {baseline}, worst repeat")
    found, blocks = pairings(index, baseline), []
    rows = {(r.pairing.method, r.region, r.metric): r for r in paired_rows(cases, policy, baseline)}
    for budget in dict.fromkeys(p.method.labels for p in found):
        budget_pairings = [p for p in found if p.method.labels == budget]
        lines = [_budget_heading(budget, [p for p in budget_pairings if not p.missing]), "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for pairing in budget_pairings:
            start = f"| {pairing.method.model} | {_unlabeled_cell(pairing.method.unlabeled, used[pairing.method])} |"
            if pairing.missing:
                lines.append(f"{start} " + " | ".join(["–", "–", pairing.missing, *["–"] * (4 * len(metrics))])
                             + " |")
                continue
            for region in region_order(cases):
                entries = []
                for metric in metrics:
                    row = rows[pairing.method, region, metric]
                    entries += [_interval(row), str(row.result.n_pairs), _p_value(row.result.p_value),
                                "–" if math.isnan(row.p_holm) else _p_value(row.p_holm)]
                entries.append(_worst_repeat(*paired_values(index, pairing, policy, region, "dice"), pairing.repeats))
                lines.append(f"{start} {region_label(region)} | {len(pairing.repeats)} | " + " | ".join(entries) + " |")
        budget_rows = [r for r in rows.values() if r.pairing.method.labels == budget]
        blocks.append("\n".join(lines) + ("\n\n" + _family_note(budget_rows, baseline) if budget_rows else ""))
    note = (f"Δ = model − {baseline} on the same test case and repeat (same seed, same labeled subset), mean over "
            "the pairs where both values exist (pairs: their number); for HD95 negative is better. "
            f"{confidence} CI: percentile bootstrap, {N_RESAMPLES} resamples that draw the test cases and the "
            f"repeats independently with replacement, seed {SEED}, not adjusted for the number of comparisons; with "
            "one repeat it covers the spread between test cases only, not between training runs. "
            f"An interval needs {MIN_CASES} distinct test cases with a pair (and so {MIN_CASES} pairs); with fewer, "
            f"however many pairs the repeats add: the mean and `n too small`, no interval and no star (below "
            f"{MIN_CASES} cases a {confidence} interval covered the true mean difference in less than 90 % of "
            "simulated data sets even when the differences were normal, docs/study.md). "
            "p: two-sided Wilcoxon signed-rank test of the per-case differences averaged over the repeats; "
            "p Holm: adjusted by Holm's method over the comparisons of its table (every model, region and metric "
            f"with an interval). * marks an interval that excludes 0 whose Holm-adjusted p is below {ALPHA}. "
            f"Dice ÷ {baseline}, worst repeat: per repeat, the model's mean Dice over the paired test cases divided by "
            f"{baseline}'s on the same repeat and cases; the lowest, with its repeat; ! below {COLLAPSE_RATIO} (the "
            "model lost more than half of what the baseline reached with the same seed and labeled cases).")
    return "\n\n".join([*blocks, note])


def write_paired_csv(rows: Sequence[PairedRow], path: str) -> str:
    """Write one CSV line per paired comparison with :data:`PAIRED_CSV_COLUMNS` (unadjusted interval, raw p)."""
    with atomic_text(path) as f:
        writer = csv.writer(f)
        writer.writerow(PAIRED_CSV_COLUMNS)
        for r in rows:
            cell, result = r.pairing.method, r.result
            writer.writerow([r.policy, cell.labels, cell.model, "" if cell.unlabeled is None else cell.unlabeled,
                             r.region, r.metric, len(r.pairing.repeats), result.n_pairs, result.n_cases, result.mean,
                             result.low, result.high, result.too_few_cases, result.p_value, r.p_holm, r.starred])
    return path


def markdown_report(cases: Sequence[CaseResult], baseline: str = BASELINE) -> str:
    """``results.md``: per empty-mask policy, Table 1 and the paired differences to ``baseline``."""
    parts = ["# Study results"]
    for policy in policy_order(cases):
        parts += [f"## {POLICY_TITLES[policy]}", f"Empty masks: {EMPTY_POLICY_DESCRIPTIONS[policy]}.",
                  "### Table 1",
                  "Mean over the test cases of each repeat (NaN values left out), then mean ± sample std over the "
                  "repeats (the std only with more than one).",
                  markdown_table(cases, policy),
                  f"### Paired differences to {baseline}", paired_tables(cases, policy, baseline)]
    return "\n\n".join(parts)


def _series_name(cell: CellKey) -> str:
    """A cell's name in plot legends: the model, with its unlabeled count if it has one."""
    return cell.model if cell.unlabeled is None else f"{cell.model} (+{cell.unlabeled} unlabeled)"


def _plot_panels(series: dict[str, list[tuple[int, str, float]]], regions: list[str], xlabel: str,
                 title: str, path: str) -> str:
    """Draw one log-x panel per region, per series a mean line with ± std band over its (x, region, Dice)
    points (one per repeat); save a PNG."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig = Figure(figsize=(4.2 * len(regions), 3.8), layout="constrained")
    axes = fig.subplots(1, len(regions), squeeze=False)[0]
    xs = sorted({x for points in series.values() for x, _, _ in points})
    for ax, region in zip(axes, regions):
        for name, points in series.items():
            line_xs = sorted({x for x, g, _ in points if g == region})
            stats = np.array([mean_and_std([d for x, g, d in points if (x, g) == (at, region)])[:2] for at in line_xs])
            mean, std = stats.reshape(-1, 2).T
            (line,) = ax.plot(line_xs, mean, marker="o", label=name)
            ax.fill_between(line_xs, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
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


def _plotted(rows: Sequence[ResultRow]) -> tuple[list[ResultRow], str]:
    """Return the rows of the policy the plots show (the first present) and its title."""
    policy = policy_order(rows)[0]
    return [r for r in rows if r.policy == policy], POLICY_TITLES[policy]


def plot_dice_vs_labels(rows: Sequence[ResultRow], path: str) -> str:
    """Fig. 2: Dice vs number of labeled images, one line (± std over repeats) per model and unlabeled count."""
    rows, convention = _plotted(rows)
    series: dict[str, list[tuple[int, str, float]]] = {}
    for r in rows:
        series.setdefault(_series_name(cell_of(r)), []).append((r.labels, r.region, r.dice))
    return _plot_panels(series, region_order(rows), "number of labeled images",
                        f"Test Dice vs number of labels ({convention}; mean ± std over repeats)", path)


def plot_dice_vs_unlabeled(rows: Sequence[ResultRow], path: str) -> str | None:
    """Fig. 4: Dice vs number of unlabeled images per (model, labels) with several counts; None if none."""
    rows, convention = _plotted(rows)
    series: dict[str, list[tuple[int, str, float]]] = {}
    for r in rows:
        if r.unlabeled is not None:
            series.setdefault(f"{r.model} ({r.labels} labels)", []).append((r.unlabeled, r.region, r.dice))
    series = {name: points for name, points in series.items() if len({x for x, _, _ in points}) > 1}
    if not series:
        return None
    return _plot_panels(series, region_order(rows), "number of unlabeled images",
                        f"Test Dice vs number of unlabeled images ({convention}; mean ± std over repeats)", path)


def _draw_interval(ax: Axes, x: float, row: PairedRow) -> None:
    """Draw a comparison's interval (with its star) right of its group, or ``n too small`` above it."""
    result = row.result
    if result.too_few_cases:
        ax.text(x, 0.97, "n too small", transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize="small")
    elif not math.isnan(result.low):
        # max(0, ...): when every difference is the same, a bootstrap end can differ from the mean by a rounding error
        below, above = max(0.0, result.mean - result.low), max(0.0, result.high - result.mean)
        ax.errorbar([x + 0.42], [result.mean], yerr=[[below], [above]],
                    fmt="none", ecolor="black", elinewidth=1, capsize=3)
        if row.starred:
            ax.text(x + 0.42, result.high, "*", ha="center", va="bottom")


def paired_figure(cases: Sequence[CaseResult], baseline: str = BASELINE) -> Figure | None:
    """The paired plot as a matplotlib ``Figure`` (see :func:`plot_paired_dice`); None if nothing is paired."""
    from matplotlib.figure import Figure

    index = index_cases(cases)
    found = [p for p in pairings(index, baseline) if not p.missing]
    if not found:
        return None
    policy, regions = policy_order(cases)[0], region_order(cases)
    rows = {(r.pairing.method, r.region): r for r in paired_rows(cases, policy, baseline) if r.metric == "dice"}
    colors = {model: f"C{i}" for i, model in enumerate(dict.fromkeys(p.method.model for p in found))}
    fig = Figure(figsize=(max(7.0, 1.5 + 0.8 * len(found)), 2.8 * len(regions)), layout="constrained")
    axes = fig.subplots(len(regions), 1, squeeze=False)[:, 0]
    for ax, region in zip(axes, regions):
        ax.axhline(0.0, color="black", linewidth=0.8)
        for x, pairing in enumerate(found):
            differences = paired_differences(*paired_values(index, pairing, policy, region, "dice"))
            # every case at the same offset in every group, so that one case can be followed across models
            n_cases = differences.shape[1]
            offsets = x + (np.linspace(-0.3, 0.3, n_cases) if n_cases > 1 else np.zeros(n_cases))
            color = colors[pairing.method.model]
            for repeat in differences:
                ax.scatter(offsets, repeat, s=6, color=color, alpha=0.3, linewidths=0)
            ax.scatter(offsets, case_means(differences), s=16, color=color)
            ax.hlines(mean_and_std(differences.ravel())[0], x - 0.38, x + 0.38, color="black")
            _draw_interval(ax, x, rows[pairing.method, region])
        ax.set_xticks(range(len(found)), [f"{_series_name(p.method)}\n{p.method.labels} labels" for p in found],
                      fontsize="small")
        ax.set(title=region_label(region), ylabel=f"ΔDice vs {baseline}")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"Per test case ΔDice, model − {baseline} ({POLICY_TITLES[policy]})\n"
                 "faint: one repeat, solid: mean over repeats, bar: mean over all pairs\n"
                 f"whisker: its {CONFIDENCE:.0%} interval from {MIN_CASES} test cases on, * as in results.md (Holm)")
    return fig


def plot_paired_dice(cases: Sequence[CaseResult], path: str, baseline: str = BASELINE) -> str | None:
    """Per test case ΔDice (model − baseline) of every paired cell, one panel per region, with the mean, its
    interval and star as in the paired table; None if none."""
    fig = paired_figure(cases, baseline)
    if fig is None:
        return None
    fig.savefig(path, dpi=100)
    return path


def write_report(cases: Sequence[CaseResult], folder: str, baseline: str = BASELINE) -> dict[str, str]:
    """Write the CSV, ``results.md`` and the plots into ``folder``; return ``{kind: path}``."""
    if not cases:
        raise ValueError("no case results to report")
    os.makedirs(folder, exist_ok=True)
    paths = {kind: os.path.join(folder, name) for kind, name in FILES.items()}
    rows = result_rows(cases)
    write_csv(rows, paths["csv"])
    write_csv(cases, paths["cases_csv"])
    write_paired_csv([r for policy in policy_order(cases) for r in paired_rows(cases, policy, baseline)],
                     paths["paired_csv"])
    write_text_atomic(paths["table"], markdown_report(cases, baseline) + "\n")
    plot_dice_vs_labels(rows, paths["fig2"])
    optional = {"fig4": plot_dice_vs_unlabeled(rows, paths["fig4"]),
                "paired": plot_paired_dice(cases, paths["paired"], baseline)}
    for kind, written in optional.items():
        if written is None:
            if os.path.exists(paths[kind]):
                os.remove(paths[kind])  # a stale plot from an earlier grid would be misleading
            del paths[kind]
    return paths
