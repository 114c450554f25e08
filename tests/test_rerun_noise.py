"""benchmarks/rerun_noise.py: the same cells trained twice, paired as a study pairs a model with its baseline. An
identical rerun gives zero difference; a rerun that lost one repeat's region is flagged; mismatched folders are
refused by name."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "rerun_noise.py"
spec = importlib.util.spec_from_file_location("rerun_noise", SCRIPT)
rerun_noise = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rerun_noise)

CASES = [f"case_{i:02d}" for i in range(12)]
TRAINER = "EncDecTrainer_6labels_10epochs_50iters_noMirroring_s{}"


def write_study(folder: Path, dice: dict[int, list[float]]) -> Path:
    """A study output folder with one evaluated cell per repeat: region 'tumour' has the given per-case Dice under
    both empty-mask conventions (HD95 1 mm)."""
    for repeat, values in dice.items():
        out = folder / "predictions" / TRAINER.format(repeat) / "folds_0"
        out.mkdir(parents=True)
        for policy in ("brats", "nan"):
            summary = {"conventions": {"empty_policy": policy},
                       "metric_per_case": [{"case": c, "metrics": {"tumour": {"Dice": d, "HD95": 1.0}}}
                                           for c, d in zip(CASES, values)]}
            (out / f"summary_{policy}.json").write_text(json.dumps(summary))
    return folder


def dice_row(rows: list[dict], policy: str = "brats") -> dict:
    [row] = [r for r in rows if r["policy"] == policy and r["metric"] == "dice"]
    return row


def test_an_identical_rerun_differs_by_nothing(tmp_path):
    values = {k: [0.5 + 0.03 * i + 0.01 * k for i in range(len(CASES))] for k in range(3)}
    first, rerun = write_study(tmp_path / "a", values), write_study(tmp_path / "b", values)
    row = dice_row(rerun_noise.summary_rows(rerun_noise.paired_cases(str(first), str(rerun), "rerun")))
    assert (row["mean"], row["low"], row["high"]) == (0.0, 0.0, 0.0)
    assert row["repeats"] == 3 and row["pairs"] == 3 * len(CASES) and row["worst_ratio"] == pytest.approx(1.0)


def test_a_rerun_that_lost_a_repeat_is_flagged_with_its_repeat(tmp_path):
    values = {k: [0.8] * len(CASES) for k in range(3)}
    lost = {**values, 1: [0.3] * len(CASES)}  # repeat 1 of the rerun reaches 0.3 / 0.8 = 0.375 of the first
    rows = rerun_noise.summary_rows(rerun_noise.paired_cases(str(write_study(tmp_path / "a", values)),
                                                             str(write_study(tmp_path / "b", lost)), "rerun"))
    row = dice_row(rows)
    assert row["worst_ratio"] == pytest.approx(0.375) and row["worst_repeat"] == 1
    assert row["mean"] == pytest.approx(-0.5 / 3) and row["low"] < -0.1


def test_folders_that_do_not_hold_the_same_cells_are_refused_by_name(tmp_path):
    first = write_study(tmp_path / "a", {0: [0.5] * len(CASES)})
    rerun = write_study(tmp_path / "b", {0: [0.5] * len(CASES), 1: [0.5] * len(CASES)})
    with pytest.raises(ValueError, match=r"b has cells .*_s1/folds_0"):
        rerun_noise.paired_cases(str(first), str(rerun), "rerun")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no predictions"):
        rerun_noise.paired_cases(str(first), str(tmp_path / "empty"), "rerun")


def test_the_script_prints_the_study_table_and_writes_json(tmp_path):
    values = {k: [0.5 + 0.03 * i for i in range(len(CASES))] for k in range(2)}
    first = write_study(tmp_path / "a", values)
    rerun = write_study(tmp_path / "b", {k: [v - 0.1 for v in vs] for k, vs in values.items()})
    out = subprocess.run([sys.executable, str(SCRIPT), "--first", str(first), "--rerun", str(rerun), "--name",
                          "2 threads", "--output", str(tmp_path / "res")], capture_output=True, text=True, check=True)
    assert "## 2 threads − first (brats convention)" in out.stdout and "| 2 threads |" in out.stdout
    saved = json.loads((tmp_path / "res" / "rerun_noise.json").read_text())
    assert dice_row(saved["rows"], "nan")["mean"] == pytest.approx(-0.1)
