"""Study report from hand-made per-case results: CSV, results.md (Table 1, paired differences), PNG plots."""

from __future__ import annotations

import csv
import math
import os
from dataclasses import replace

import matplotlib.image
import numpy as np
import pytest

from nnunet_ext.evaluation.report import (
    CSV_COLUMNS,
    PAIRED_CSV_COLUMNS,
    CaseResult,
    markdown_report,
    markdown_table,
    paired_figure,
    paired_tables,
    read_cases_csv,
    region_order,
    result_rows,
    write_csv,
    write_report,
)
from nnunet_ext.evaluation.statistics import MIN_CASES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# dataset.json order (whole tumor first), as evaluate_folder reports regions
REGIONS = ("whole tumor", "tumor core", "enhancing tumor")
PAPER_ORDER = ("enhancing tumor", "tumor core", "whole tumor")


def _offsets(n_cases: int) -> dict[str, float]:
    """Per-case offsets from −0.03 to 0.03 with mean 0 (0 for one case): a region's test mean is the value given."""
    spread = (np.arange(n_cases) - (n_cases - 1) / 2) * (0.06 / max(n_cases - 1, 1))
    return {f"c{i}": float(offset) for i, offset in enumerate(spread)}


def _cases(model: str, labels: int, unlabeled: int | None, dice: tuple[float, float, float],
           hd95: tuple[float, float, float], repeat: int = 0, policy: str = "brats",
           used: tuple[int, ...] = (), n_cases: int = 4) -> list[CaseResult]:
    """Per-case results of one repeat of a cell; ``dice``/``hd95`` are the ET, TC, WT test means."""
    trainer = f"{model}Trainer_{labels}labels" + (f"_{unlabeled}unlabeled" if unlabeled else "")
    by_region = dict(zip(PAPER_ORDER, zip(dice, hd95)))
    return [CaseResult(trainer, model, labels, unlabeled, (0, 1), repeat, g, policy,
                       by_region[g][0] + offset, by_region[g][1] + 10 * offset, used, case=case)
            for case, offset in _offsets(n_cases).items() for g in REGIONS]


@pytest.fixture
def cases() -> list[CaseResult]:
    return [*_cases("EncDec", 3, None, (0.5, 0.6, 0.7), (20.0, 21.0, 22.0)),
            *_cases("EncDec", 6, None, (0.8412, 0.8383, 0.9144), (11.47, 20.12, 24.37)),
            *_cases("ssCPCSeg", 6, None, (0.8873, 0.8761, 0.9151), (8.71, 16.09, 12.4))]


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_SIGNATURE


def _rows_of(table: str) -> list[str]:
    """The body lines of every markdown table in ``table``."""
    return [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| model")]


def test_region_order_is_paper_order_for_brats_else_first_appearance(cases):
    assert region_order(cases) == list(PAPER_ORDER)
    other = [CaseResult("T", "M", 3, None, (0,), 0, g, "brats", 1.0, 0.0, case="c") for g in ("liver", "tumor")]
    assert region_order(other) == ["liver", "tumor"]


def test_csv_has_one_row_per_cell_repeat_policy_region_with_the_case_mean(cases, tmp_path):
    cases += _cases("EncDec", 6, None, (0.5, 0.5, 0.5), (1.0, 1.0, 1.0), repeat=1)
    cases += _cases("EncDec", 6, None, (0.4, 0.4, 0.4), (1.0, 1.0, 1.0), policy="nan")
    paths = write_report(cases, str(tmp_path))
    with open(paths["csv"], newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        lines = list(reader)
    assert len(lines) == 5 * 3
    et = [r for r in lines if r["trainer"] == "EncDecTrainer_6labels" and r["region"] == "enhancing tumor"]
    assert [(r["repeat"], r["policy"]) for r in et] == [("0", "brats"), ("0", "nan"), ("1", "brats")]
    assert float(et[0].pop("dice")) == pytest.approx(0.8412) and float(et[0].pop("hd95_mm")) == pytest.approx(11.47)
    assert et[0] == {"trainer": "EncDecTrainer_6labels", "model": "EncDec", "labels": "6", "unlabeled": "",
                     "folds": "0 1", "repeat": "0", "region": "enhancing tumor", "policy": "brats",
                     "unlabeled_used": "", "plans": "", "norm": ""}


def test_case_means_leave_nan_out():
    cases = [CaseResult("T", "M", 3, None, (0,), 0, "a", "nan", d, h, case=c)
             for c, d, h in (("c0", 0.2, math.nan), ("c1", math.nan, math.nan), ("c2", 0.6, 4.0))]
    (row,) = result_rows(cases)
    assert row.dice == pytest.approx(0.4) and row.hd95 == 4.0


def test_table1_columns_rows_and_formatting_with_one_repeat(cases):
    lines = markdown_table(cases).splitlines()
    assert lines[0] == ("| model | labels | unlabeled | Dice ET | Dice TC | Dice WT | "
                        "HD95 ET (mm) | HD95 TC (mm) | HD95 WT (mm) | repeats | plans (norm) |")
    assert lines[1] == "|" + "---|" * 11
    assert lines[2:] == [
        "| EncDec | 3 | – | 0.5000 | 0.6000 | 0.7000 | 20.00 | 21.00 | 22.00 | 1 | – |",
        "| EncDec | 6 | – | 0.8412 | 0.8383 | 0.9144 | 11.47 | 20.12 | 24.37 | 1 | – |",
        "| ssCPCSeg | 6 | – | 0.8873 | 0.8761 | 0.9151 | 8.71 | 16.09 | 12.40 | 1 | – |",
    ]


def test_table1_shows_mean_and_sample_std_over_two_repeats():
    cases = [*_cases("EncDec", 6, None, (0.5, 0.6, 0.7), (10.0, 20.0, 30.0), repeat=0),
             *_cases("EncDec", 6, None, (0.7, 0.6, 0.9), (12.0, 20.0, 31.0), repeat=1)]
    assert markdown_table(cases).splitlines()[2] == (
        "| EncDec | 6 | – | 0.6000 ± 0.1414 | 0.6000 ± 0.0000 | 0.8000 ± 0.1414 | "
        "11.00 ± 1.41 | 20.00 ± 0.00 | 30.50 ± 0.71 | 2 | – |")


def test_table1_marks_nan_and_missing_regions():
    cases = [CaseResult("T_3labels", "T", 3, 5, (0,), 0, "a", "brats", math.nan, 1.5, case="c"),
             CaseResult("U_3labels", "U", 3, None, (0,), 0, "b", "brats", 0.25, math.nan, case="c")]
    lines = markdown_table(cases).splitlines()
    assert lines[0] == ("| model | labels | unlabeled | Dice a | Dice b | HD95 a (mm) | HD95 b (mm) | repeats | "
                        "plans (norm) |")
    assert lines[2] == "| T | 3 | 5 | n/a | n/a | 1.50 | n/a | 1 | – |"
    assert lines[3] == "| U | 3 | – | n/a | 0.2500 | n/a | n/a | 1 | – |"


def test_table1_gives_the_unlabeled_count_of_all_available_over_folds_and_repeats():
    def case(trainer, labels, unlabeled, repeat, used):
        return CaseResult(trainer, "ss", labels, unlabeled, (0, 1), repeat, "a", "brats", 0.5, 1.0, used, case="c")

    cases = [case("ss_3labels", 3, None, 0, (26, 26)), case("ss_6labels", 6, None, 0, (24, 23)),
             case("ss_6labels", 6, None, 1, (22, 23)), case("ss_6labels_8unlabeled", 6, 8, 0, (8, 8))]
    assert [line.split(" | ")[2] for line in markdown_table(cases).splitlines()[2:]] == \
        ["all (26)", "all (22–24)", "8"]


def test_table1_and_csv_name_the_plans_and_norm_each_cell_trained_with(tmp_path):
    trainings = [("EncDec", 0, "nnUNetPlans", "InstanceNorm3d"), ("CPCSeg", 0, "nnUNetPlans", "GroupNorm"),
                 ("CPCSeg", 1, "nnUNetPlans", "GroupNorm"), ("VAESeg", 0, "nnUNetGNPlans", "GroupNorm"),
                 ("VAESeg", 1, "nnUNetPlans", "InstanceNorm3d")]
    cases = [replace(c, plans=plans, norm=norm) for model, repeat, plans, norm in trainings
             for c in _cases(model, 6, None, (0.5,) * 3, (1.0,) * 3, repeat)]
    assert [line.rsplit(" | ", 2)[1:] for line in markdown_table(cases).splitlines()[2:]] == [
        ["1", "nnUNetPlans (InstanceNorm3d) |"], ["2", "nnUNetPlans (GroupNorm) |"],
        ["2", "nnUNetGNPlans (GroupNorm), nnUNetPlans (InstanceNorm3d) |"]]  # repeats that differ: both
    with open(write_report(cases, str(tmp_path))["csv"], newline="") as f:
        assert {(r["model"], int(r["repeat"]), r["plans"], r["norm"]) for r in csv.DictReader(f)} == set(trainings)


def test_report_has_both_conventions_in_order():
    cases = [*_cases("EncDec", 6, None, (0.5, 0.6, 0.7), (1.0, 2.0, 3.0), policy="nan"),
             *_cases("EncDec", 6, None, (0.7, 0.6, 0.7), (1.0, 2.0, 3.0), policy="brats")]
    report = markdown_report(cases)
    assert report.index("## BraTS convention") < report.index("## nnU-Net convention")
    brats, nnunet = report.split("## nnU-Net convention")
    assert "| EncDec | 6 | – | 0.7000 |" in brats and "| EncDec | 6 | – | 0.5000 |" in nnunet
    assert "both masks empty: Dice NaN" in nnunet


def test_unknown_policy_and_duplicate_cases_are_errors(cases):
    with pytest.raises(ValueError, match="empty_policy"):
        result_rows([CaseResult("T", "M", 3, None, (0,), 0, "a", "dice", 1.0, 0.0, case="c")])
    with pytest.raises(ValueError, match="two results for case 'c0', region 'whole tumor'.* repeat 0 of EncDec"):
        result_rows(cases + cases[:1])


def _shifted(model: str, labels: int, repeats: int = 2, dice_shift: float = 0.1, hd95_shift: float = -2.0,
             policy: str = "brats", n_cases: int = 4) -> list[CaseResult]:
    """EncDec and ``model`` at one budget; ``model`` is EncDec shifted by a constant on every case and repeat."""
    cases = []
    for k in range(repeats):
        base = (0.5 + 0.1 * k, 0.6, 0.7)
        cases += _cases("EncDec", labels, None, base, (10.0, 20.0, 30.0), repeat=k, policy=policy, n_cases=n_cases)
        cases += _cases(model, labels, None, tuple(d + dice_shift for d in base),
                        (10.0 + hd95_shift, 20.0 + hd95_shift, 30.0 + hd95_shift), repeat=k, policy=policy,
                        n_cases=n_cases)
    return cases


def _paired_csv(cases: list[CaseResult], folder) -> list[dict[str, str]]:
    """The lines of ``paired_differences.csv`` written by :func:`write_report`."""
    with open(write_report(cases, str(folder))["paired_csv"], newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == PAIRED_CSV_COLUMNS
        return list(reader)


def _texts(figure) -> list[str]:
    """The texts drawn in the panels of a figure (interval stars, ``n too small``)."""
    return [t.get_text() for ax in figure.axes for t in ax.texts]


def _intervals_drawn(figure) -> int:
    """How many intervals (error bars) the panels of a figure draw."""
    return sum(len(ax.containers) for ax in figure.axes)


def test_paired_table_gives_constant_shifts_with_zero_width_marked_intervals():
    table = paired_tables(_shifted("CPCSeg", 6, n_cases=20))
    assert table.startswith("#### 6 labels\n\n| model | unlabeled | region | repeats | ΔDice [95% CI] | Dice pairs | "
                            "Dice p | Dice p Holm | ΔHD95 (mm) [95% CI] | HD95 pairs | HD95 p | HD95 p Holm |")
    # 2 repeats x 20 cases; 20 per-case means all positive: exact two-sided Wilcoxon p = 2 / 2^20
    # worst repeat: ET 0.6 / 0.5 at repeat 0, 0.7 / 0.6 at repeat 1; TC 0.7 / 0.6 and WT 0.8 / 0.7 on both (first kept)
    assert _rows_of(table) == [
        f"| CPCSeg | – | {g} | 2 | +0.1000 [+0.1000, +0.1000] * | 40 | <0.0001 | <0.0001 | "
        f"-2.00 [-2.00, -2.00] * | 40 | <0.0001 | <0.0001 | {worst} |"
        for g, worst in (("ET", "1.17 (repeat 1)"), ("TC", "1.17 (repeat 0)"), ("WT", "1.14 (repeat 0)"))]
    assert "seed 0" in table and "10000 resamples" in table and "test cases and the" in table
    assert "Holm over the 6 comparisons of this table with intervals; 6 of their unadjusted intervals exclude 0, " \
           "where about 0.3 would by chance alone if no model differed from EncDec." in table


def test_paired_table_does_not_mark_an_interval_that_contains_zero():
    cases = _shifted("CPCSeg", 6, repeats=1, dice_shift=0.0, hd95_shift=0.0, n_cases=20)
    cases = [c if c.model == "EncDec" or c.case not in ("c0", "c19") else
             replace(c, dice=c.dice + (0.05 if c.case == "c0" else -0.05)) for c in cases]
    dice = [line.split(" | ")[4] for line in _rows_of(paired_tables(cases))]
    assert all(d.startswith("+0.0000 [-0.") and d.endswith("]") for d in dice), dice


def test_one_case_gives_the_mean_and_n_too_small_in_table_csv_and_plot(tmp_path):
    # the case: one real test case, one repeat
    cases = _shifted("ssCPCSeg", 6, repeats=1, dice_shift=-0.2135, hd95_shift=17.71, n_cases=1)
    table = paired_tables(cases)
    assert table.startswith("#### 6 labels (one repeat: the interval covers the spread between test cases only, "
                            "not between training runs)\n")
    assert _rows_of(table) == [f"| ssCPCSeg | – | {g} | 1 | -0.2135 (n too small) | 1 | 1.0000 | – | "
                               f"+17.71 (n too small) | 1 | 1.0000 | – | {worst} |"
                               for g, worst in (("ET", "0.57 (repeat 0)"), ("TC", "0.64 (repeat 0)"),
                                                ("WT", "0.69 (repeat 0)"))]  # 0.2865 / 0.5, 0.3865 / 0.6, ...
    assert f"No comparison in this table has {MIN_CASES} or more test cases: no interval, no star." in table
    assert f"An interval needs {MIN_CASES} distinct test cases with a pair" in table and "`n too small`" in table
    lines = _paired_csv(cases, tmp_path)
    assert len(lines) == 3 * 2  # 3 regions x 2 metrics
    assert {(r["n_too_small"], r["star"], r["low"], r["high"], r["p"], r["p_holm"]) for r in lines} == \
        {("True", "False", "nan", "nan", "1.0", "nan")}
    figure = paired_figure(cases)
    assert _texts(figure) == ["n too small"] * 3 and _intervals_drawn(figure) == 0


def test_identical_methods_on_20_cases_get_no_star(tmp_path):
    cases = _shifted("CPCSeg", 6, repeats=1, dice_shift=0.0, hd95_shift=0.0, n_cases=20)
    table = paired_tables(cases)
    assert _rows_of(table) == [f"| CPCSeg | – | {g} | 1 | +0.0000 [+0.0000, +0.0000] | 20 | 1.0000 | 1.0000 | "
                               "+0.00 [+0.00, +0.00] | 20 | 1.0000 | 1.0000 | 1.00 (repeat 0) |"
                               for g in ("ET", "TC", "WT")]
    assert not any(r["star"] == "True" for r in _paired_csv(cases, tmp_path))
    figure = paired_figure(cases)
    assert "*" not in _texts(figure) and _intervals_drawn(figure) == 3


def test_a_planted_difference_on_20_cases_is_starred_in_table_csv_and_plot(tmp_path):
    rng = np.random.default_rng(1)
    cases = _shifted("ssCPCSeg", 6, repeats=3, dice_shift=0.0, hd95_shift=0.0, n_cases=20)
    cases = [replace(c, dice=c.dice + 0.05 + rng.normal(0.0, 0.02)) if c.model == "ssCPCSeg" else c for c in cases]
    rows = _rows_of(paired_tables(cases))
    assert [row.split(" | ")[4].endswith(" *") for row in rows] == [True] * 3  # ΔDice starred in every region
    assert [row.split(" | ")[8].endswith(" *") for row in rows] == [False] * 3  # ΔHD95 0: not
    lines = _paired_csv(cases, tmp_path)
    assert {(r["metric"], r["star"]) for r in lines} == {("dice", "True"), ("hd95", "False")}
    for r in lines:  # raw p and its Holm adjustment side by side
        assert float(r["p"]) <= float(r["p_holm"]) <= 1.0 and r["n_too_small"] == "False"
    figure = paired_figure(cases)
    assert _texts(figure) == ["*"] * 3 and _intervals_drawn(figure) == 3


def test_stars_only_after_holm_over_the_comparisons_of_a_table():
    # ET: −0.06, −0.05, …, +0.13 (mean +0.035, interval about [+0.01, +0.06], Wilcoxon p 0.024); the other 5
    # comparisons of the table (TC, WT, HD95) are identical, p = 1, so Holm multiplies that p by 6
    differences = [0.01 * (i - 6) for i in range(20)]
    cases = _shifted("CPCSeg", 6, repeats=1, dice_shift=0.0, hd95_shift=0.0, n_cases=20)
    cases = [replace(c, dice=c.dice + differences[int(c.case[1:])])
             if (c.model, c.region) == ("CPCSeg", "enhancing tumor") else c for c in cases]
    table = paired_tables(cases)
    et = _rows_of(table)[0].split(" | ")
    assert et[4].endswith("]") and float(et[4].split("[")[1].split(",")[0]) > 0  # the interval excludes 0 ...
    assert float(et[6]) < 0.05 <= float(et[7])  # ... and the raw p is small, but Holm's is not: no star
    assert "Holm over the 6 comparisons of this table with intervals; 1 of their unadjusted intervals exclude 0" \
        in table


def test_heading_says_when_intervals_cover_test_cases_only():
    cases = _shifted("CPCSeg", 6, repeats=2) + [c for c in _shifted("VAESeg", 6, repeats=1) if c.model == "VAESeg"]
    assert paired_tables(cases).startswith("#### 6 labels (rows with 1 repeat: the interval covers the spread between "
                                           "test cases only, not between training runs)\n")
    assert paired_tables(_shifted("CPCSeg", 6, repeats=2)).startswith("#### 6 labels\n")


def test_a_collapsed_repeat_is_flagged_with_its_ratio_to_the_baseline():
    """Repeat 1 of ET at 0.2 against EncDec's 0.6 (ratio 0.33) is flagged; TC at 0.55 / 0.6 on both repeats is not."""
    cases = _shifted("CPCSeg", 6, repeats=2, dice_shift=0.0, hd95_shift=0.0)
    cases = [replace(c, dice=0.2 if c.region == "enhancing tumor" else c.dice - 0.05)
             if (c.model, c.repeat) == ("CPCSeg", 1) else c for c in cases]
    cases = [replace(c, dice=c.dice - 0.05) if (c.model, c.repeat, c.region) == ("CPCSeg", 0, "tumor core") else c
             for c in cases]
    worst = [row.split(" | ")[-1].removesuffix(" |") for row in _rows_of(paired_tables(cases))]
    assert worst == ["0.33 (repeat 1) !", "0.92 (repeat 0)", "0.93 (repeat 1)"]


def test_paired_table_counts_pairs_without_nan():
    cases = _shifted("CPCSeg", 6, repeats=1, policy="nan")
    cases = [replace(c, dice=math.nan) if (c.model, c.case, c.region) ==
             ("CPCSeg", "c1", "enhancing tumor") else c for c in cases]
    et = _rows_of(paired_tables(cases, "nan"))[0].split(" | ")
    assert et[2:8] == ["ET", "1", "+0.1000 (n too small)", "3", "0.2500", "–"]


def test_paired_table_says_when_there_is_no_baseline():
    cases = _shifted("CPCSeg", 6) + _cases("CPCSeg", 12, None, (0.5, 0.5, 0.5), (1.0, 1.0, 1.0), repeat=0)
    cases += _cases("VAESeg", 6, None, (0.5, 0.5, 0.5), (1.0, 1.0, 1.0), repeat=5)
    rows = _rows_of(paired_tables(cases))
    assert "| VAESeg | – | – | – | no EncDec repeat matches repeats 5 (EncDec has 0 1) | – | – | – | – | – | – | – " \
        "| – |" in rows
    assert "| CPCSeg | – | – | – | no EncDec at 12 labels | – | – | – | – | – | – | – | – |" in rows
    assert paired_tables(_cases("CPCSeg", 6, None, (0.5,) * 3, (1.0,) * 3)) == \
        "No EncDec cells, so no paired differences (choose the baseline model with --baseline)."


def test_baseline_model_is_a_parameter():
    cases = _shifted("CPCSeg", 6)
    rows = _rows_of(paired_tables(cases, baseline="CPCSeg"))
    assert rows[0].startswith("| EncDec | – | ET | 2 | -0.1000 (n too small) |")


def test_report_is_reproducible_and_has_table1_and_marked_paired_table(tmp_path):
    cases = _shifted("ssCPCSeg", 6, n_cases=20)
    first = write_report(cases, str(tmp_path / "a"))
    second = write_report(cases, str(tmp_path / "b"))
    text = (tmp_path / "a" / "results.md").read_text()
    assert text == (tmp_path / "b" / "results.md").read_text()
    assert text.startswith("# Study results\n\n## BraTS convention")
    assert "| EncDec | 6 | – | 0.5500 ± 0.0707 |" in text and "### Paired differences to EncDec" in text
    assert "| ssCPCSeg | – | ET | 2 | +0.1000 [+0.1000, +0.1000] * |" in text
    assert (tmp_path / "a" / "paired_differences.csv").read_text() == \
        (tmp_path / "b" / "paired_differences.csv").read_text()
    assert set(first) == set(second) == {"csv", "cases_csv", "table", "paired_csv", "fig2", "paired"}


def test_plots_are_valid_pngs_and_fig4_needs_several_unlabeled_counts(cases, tmp_path):
    paths = write_report(cases, str(tmp_path))
    assert set(paths) == {"csv", "cases_csv", "table", "paired_csv", "fig2", "paired"}
    for kind in ("fig2", "paired"):
        assert _is_png(paths[kind]) and matplotlib.image.imread(paths[kind]).ndim == 3
    assert not (tmp_path / "fig4_dice_vs_unlabeled.png").exists()


def test_fig2_draws_a_band_over_repeats(tmp_path):
    def fig2(spread: float, folder: str) -> bytes:
        cases = [*_cases("EncDec", 3, None, (0.5 - spread,) * 3, (1.0,) * 3, repeat=0),
                 *_cases("EncDec", 3, None, (0.5 + spread,) * 3, (1.0,) * 3, repeat=1),
                 *_cases("EncDec", 6, None, (0.7,) * 3, (1.0,) * 3, repeat=0)]
        return open(write_report(cases, str(tmp_path / folder))["fig2"], "rb").read()

    assert fig2(0.1, "spread") != fig2(0.0, "flat")  # same mean line; only the ± std band differs


def test_fig4_and_paired_plot_written_when_possible_and_removed_when_stale(cases, tmp_path):
    ss = [*_cases("ssCPCSeg", 6, 10, (0.6, 0.6, 0.6), (9.0, 9.0, 9.0)),
          *_cases("ssCPCSeg", 6, 100, (0.7, 0.7, 0.7), (8.0, 8.0, 8.0))]
    paths = write_report(cases + ss, str(tmp_path))
    assert _is_png(paths["fig4"]) and _is_png(paths["fig2"]) and _is_png(paths["paired"])
    paths = write_report([c for c in cases if c.model == "EncDec"], str(tmp_path))
    assert set(paths) == {"csv", "cases_csv", "table", "paired_csv", "fig2"}
    assert not (tmp_path / "fig4_dice_vs_unlabeled.png").exists() and not (tmp_path / "fig_paired_dice.png").exists()


def test_one_unlabeled_count_gives_no_fig4(tmp_path):
    ss = _cases("ssCPCSeg", 6, 10, (0.6, 0.6, 0.6), (9.0, 9.0, 9.0)) + \
        _cases("ssCPCSeg", 12, 10, (0.7, 0.7, 0.7), (8.0, 8.0, 8.0))
    assert "fig4" not in write_report(ss, str(tmp_path))


def test_no_cases_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no case results"):
        write_report([], str(tmp_path))


def test_optional_metrics_join_the_csv_table1_and_paired_tables_only_when_present(cases, tmp_path):
    plain_head = markdown_table(cases).splitlines()[0]
    extra = [replace(c, lesion_dice=c.dice - 0.1, lesion_hd95=c.hd95 + 5, nsd=c.dice / 2) for c in cases]
    paths = write_report(extra, str(tmp_path))
    with open(paths["csv"], newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == (*CSV_COLUMNS, "lesion_dice", "lesion_hd95_mm", "nsd")
        et = next(r for r in reader if r["trainer"] == "EncDecTrainer_6labels" and r["region"] == "enhancing tumor")
    assert float(et["lesion_dice"]) == pytest.approx(0.7412) and float(et["nsd"]) == pytest.approx(0.4206)
    head = markdown_table(extra).splitlines()[0]
    assert head.startswith(plain_head.rsplit(" | repeats", 1)[0] + " | lesion-wise Dice ET | lesion-wise Dice TC | ")
    assert "| lesion-wise HD95 WT (mm) | NSD ET | NSD TC | NSD WT | repeats |" in head
    row = next(line for line in markdown_table(extra).splitlines() if line.startswith("| ssCPCSeg | 6 "))
    assert "| 0.7873 | 0.7761 | 0.8151 | 13.71 | 21.09 | 17.40 | 0.4436 |" in row
    paired = paired_tables(extra)
    assert "Δlesion-wise Dice [95% CI] | lesion-wise Dice pairs |" in paired and "ΔNSD [95% CI]" in paired
    assert "lesion-wise" not in paired_tables(cases)
    nsd_only = [replace(c, nsd=0.5) for c in cases]  # a metric no case holds stays out
    assert "lesion-wise" not in markdown_table(nsd_only) and "NSD ET" in markdown_table(nsd_only)
    surfels = [replace(c, hd95_surfels=c.hd95 - 1) for c in cases]
    assert "| HD95 surfels ET (mm) | HD95 surfels TC (mm) | HD95 surfels WT (mm) | repeats |" in markdown_table(surfels)


def test_cases_csv_reads_back_every_case_result_exactly_and_remakes_the_same_report(cases, tmp_path):
    odd = [replace(c, dice=c.dice / 3, hd95=math.nan if i % 7 == 0 else c.hd95, unlabeled=12, unlabeled_used=(12, 11),
                   plans="nnUNetCPU96GNPlans", norm="GroupNorm", nsd=c.dice / 7) for i, c in enumerate(cases)]
    paths = write_report(odd, str(tmp_path / "a"))
    back = read_cases_csv(paths["cases_csv"])
    assert len(back) == len(odd)
    for got, want in zip(back, odd):  # floats by repr: bit for bit, NaN stays NaN, tuples and None restored
        assert got.__dict__.keys() == want.__dict__.keys()
        for key, value in want.__dict__.items():
            same = (math.isnan(value) and math.isnan(getattr(got, key))) if isinstance(value, float) and \
                math.isnan(value) else getattr(got, key) == value
            assert same, (key, getattr(got, key), value)
    again = write_report(back, str(tmp_path / "b"))
    for kind in ("csv", "cases_csv", "table", "paired_csv"):
        assert open(paths[kind]).read() == open(again[kind]).read(), kind
    assert read_cases_csv(paths["cases_csv"])[0].unlabeled == 12 and back[0].lesion_dice != back[0].lesion_dice


def test_read_cases_csv_refuses_a_results_csv_and_a_malformed_line_by_name(cases, tmp_path):
    paths = write_report(cases, str(tmp_path))
    with pytest.raises(ValueError, match="results.csv: not a cases.csv of nnunet-ext study: no column case "
                                         r"\(a results.csv holds means"):
        read_cases_csv(paths["csv"])
    lines = open(paths["cases_csv"]).read().splitlines()
    lines[3] = lines[3].replace("brats,", "brats,not-a-number", 1)
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="bad.csv, line 4: could not convert"):
        read_cases_csv(str(tmp_path / "bad.csv"))


def test_report_command_merges_the_repeats_of_two_runs_into_the_report_of_all_of_them(tmp_path, capsys):
    from nnunet_ext.cli import main

    everything = _shifted("ssCPCSeg", 6, repeats=2, n_cases=10)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_csv([c for c in everything if c.repeat == 0], str(tmp_path / "a" / "cases.csv"))
    second = write_csv([c for c in everything if c.repeat == 1], str(tmp_path / "b" / "cases.csv"))
    whole = write_report(everything, str(tmp_path / "whole"))
    assert main(["report", "--cases", first, second, "--output", str(tmp_path / "merged")]) == 0
    assert "[report] 120 case results, 4 cell repeats from 2 file(s)" in capsys.readouterr().out
    for kind in ("csv", "cases_csv", "table", "paired_csv"):
        name = os.path.basename(whole[kind])
        assert (tmp_path / "merged" / name).read_text() == open(whole[kind]).read(), kind
    before = (tmp_path / "whole" / "results.md").read_text()
    assert main(["report", "--cases", first, "--output", str(tmp_path / "whole")]) == 2  # never overwritten
    assert "already holds a report (results.csv, cases.csv, results.md" in capsys.readouterr().err
    assert (tmp_path / "whole" / "results.md").read_text() == before


def test_report_command_refuses_a_repeat_held_twice_and_a_cell_trained_with_other_plans(tmp_path):
    from nnunet_ext.commands.report import merged_cases

    cases = _shifted("ssCPCSeg", 6, repeats=2, n_cases=3)
    for name, chosen in (("a", cases), ("b", [c for c in cases if c.repeat == 1]),
                         ("c", [replace(c, repeat=5, plans="nnUNetGNPlans", norm="GroupNorm") for c in cases])):
        (tmp_path / name).mkdir()
        write_csv(chosen, str(tmp_path / name / "cases.csv"))
    a, b, c = (str(tmp_path / name / "cases.csv") for name in "abc")
    with pytest.raises(ValueError, match=r"b/cases.csv and .*a/cases.csv both hold case 'c0', region 'whole tumor', "
                                         r"policy 'brats' of repeat 1 of EncDec .*the same repeat trained twice"):
        merged_cases([a, b])
    with pytest.raises(ValueError, match=r"EncDec with 6 labels was trained with  \(\) in .*a/cases.csv but with "
                                         r"nnUNetGNPlans \(GroupNorm\) in .*c/cases.csv: not one cell"):
        merged_cases([a, c])
    assert len(merged_cases([a])) == len(cases)  # the positive control: one run merges with nothing
    (tmp_path / "d").mkdir()
    write_csv([replace(c, repeat=7, nsd=0.5) for c in cases], str(tmp_path / "d" / "cases.csv"))
    with pytest.raises(ValueError, match=r"d/cases.csv has the columns .*, nsd, but .*a/cases.csv has .*different "
                                         r"--metrics"):
        merged_cases([a, str(tmp_path / "d" / "cases.csv")])
    with pytest.raises(FileNotFoundError, match="--cases: no file"):
        merged_cases([str(tmp_path / "missing.csv")])
