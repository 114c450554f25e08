"""Study report from hand-made result rows: CSV, Table-1 markdown, Fig-2 and Fig-4 PNGs."""

from __future__ import annotations

import csv
import math

import matplotlib.image
import pytest

from nnunet_ext.evaluation.report import (
    CSV_COLUMNS,
    ResultRow,
    markdown_table,
    region_order,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# dataset.json order (whole tumor first), as evaluate_folder reports regions
REGIONS = ("whole tumor", "tumor core", "enhancing tumor")


def _rows(model: str, labels: int, unlabeled: int | None, dice: tuple[float, float, float],
          hd95: tuple[float, float, float]) -> list[ResultRow]:
    """Rows of one cell; ``dice``/``hd95`` in ET, TC, WT order like the paper."""
    trainer = f"{model}Trainer_{labels}labels" + (f"_{unlabeled}unlabeled" if unlabeled else "")
    by_region = dict(zip(("enhancing tumor", "tumor core", "whole tumor"), zip(dice, hd95)))
    return [ResultRow(trainer, model, labels, unlabeled, (0, 1), g, *by_region[g]) for g in REGIONS]


@pytest.fixture
def rows() -> list[ResultRow]:
    return [*_rows("EncDec", 3, None, (0.5, 0.6, 0.7), (20.0, 21.0, 22.0)),
            *_rows("EncDec", 6, None, (0.8412, 0.8383, 0.9144), (11.47, 20.12, 24.37)),
            *_rows("ssCPCSeg", 6, None, (0.8873, 0.8761, 0.9151), (8.71, 16.09, 12.4))]


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG_SIGNATURE


def test_region_order_is_paper_order_for_brats_else_first_appearance(rows):
    assert region_order(rows) == ["enhancing tumor", "tumor core", "whole tumor"]
    other = [ResultRow("T", "M", 3, None, (0,), g, 1.0, 0.0) for g in ("liver", "tumor")]
    assert region_order(other) == ["liver", "tumor"]


def test_csv_columns_and_values(rows, tmp_path):
    paths = write_report(rows, str(tmp_path))
    with open(paths["csv"], newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        lines = list(reader)
    assert len(lines) == 9
    et = next(r for r in lines if r["trainer"] == "EncDecTrainer_6labels" and r["region"] == "enhancing tumor")
    assert et == {"trainer": "EncDecTrainer_6labels", "model": "EncDec", "labels": "6", "unlabeled": "",
                  "folds": "0 1", "region": "enhancing tumor", "dice": "0.8412", "hd95_mm": "11.47",
                  "unlabeled_used": ""}


def test_markdown_table_columns_rows_and_formatting(rows):
    lines = markdown_table(rows).splitlines()
    assert lines[0] == ("| model | labels | unlabeled | Dice ET | Dice TC | Dice WT | "
                        "HD95 ET (mm) | HD95 TC (mm) | HD95 WT (mm) |")
    assert lines[1] == "|" + "---|" * 9
    assert lines[2:] == [
        "| EncDec | 3 | – | 0.5000 | 0.6000 | 0.7000 | 20.00 | 21.00 | 22.00 |",
        "| EncDec | 6 | – | 0.8412 | 0.8383 | 0.9144 | 11.47 | 20.12 | 24.37 |",
        "| ssCPCSeg | 6 | – | 0.8873 | 0.8761 | 0.9151 | 8.71 | 16.09 | 12.40 |",
    ]


def test_markdown_table_marks_nan_and_missing_regions():
    rows = [ResultRow("T_3labels", "T", 3, 5, (0,), "a", math.nan, 1.5),
            ResultRow("U_3labels", "U", 3, None, (0,), "b", 0.25, math.nan)]
    lines = markdown_table(rows).splitlines()
    assert lines[0] == "| model | labels | unlabeled | Dice a | Dice b | HD95 a (mm) | HD95 b (mm) |"
    assert lines[2] == "| T | 3 | 5 | n/a | n/a | 1.50 | n/a |"
    assert lines[3] == "| U | 3 | – | n/a | 0.2500 | n/a | n/a |"


def test_markdown_table_gives_the_unlabeled_count_of_all_available():
    rows = [ResultRow("ss_3labels", "ss", 3, None, (0, 1), "a", 0.5, 1.0, (26, 26)),
            ResultRow("ss_6labels", "ss", 6, None, (0, 1), "a", 0.5, 1.0, (24, 23)),
            ResultRow("ss_6labels_8unlabeled", "ss", 6, 8, (0, 1), "a", 0.5, 1.0, (8, 8))]
    assert [line.split(" | ")[2] for line in markdown_table(rows).splitlines()[2:]] == ["all (26)", "all (23–24)", "8"]


def test_fig2_is_a_valid_png_and_fig4_needs_several_unlabeled_counts(rows, tmp_path):
    paths = write_report(rows, str(tmp_path))
    assert set(paths) == {"csv", "table", "fig2"}
    assert _is_png(paths["fig2"])
    assert matplotlib.image.imread(paths["fig2"]).ndim == 3
    assert not (tmp_path / "fig4_dice_vs_unlabeled.png").exists()
    assert (tmp_path / "results.md").read_text().startswith("| model |")


def test_fig4_written_for_several_unlabeled_counts_and_removed_when_stale(rows, tmp_path):
    ss = [*_rows("ssCPCSeg", 6, 10, (0.6, 0.6, 0.6), (9.0, 9.0, 9.0)),
          *_rows("ssCPCSeg", 6, 100, (0.7, 0.7, 0.7), (8.0, 8.0, 8.0))]
    paths = write_report(rows + ss, str(tmp_path))
    assert _is_png(paths["fig4"]) and _is_png(paths["fig2"])
    assert matplotlib.image.imread(paths["fig4"]).shape[1] > 0
    paths = write_report(rows, str(tmp_path))
    assert "fig4" not in paths and not (tmp_path / "fig4_dice_vs_unlabeled.png").exists()


def test_one_unlabeled_count_gives_no_fig4(tmp_path):
    ss = _rows("ssCPCSeg", 6, 10, (0.6, 0.6, 0.6), (9.0, 9.0, 9.0)) + \
        _rows("ssCPCSeg", 12, 10, (0.7, 0.7, 0.7), (8.0, 8.0, 8.0))
    assert "fig4" not in write_report(ss, str(tmp_path))


def test_no_rows_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no result rows"):
        write_report([], str(tmp_path))
