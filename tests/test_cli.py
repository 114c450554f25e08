"""The command line: expected user errors print one line and exit with 2; bugs keep their traceback."""

from __future__ import annotations

import subprocess

import pytest

from nnunet_ext import cli
from nnunet_ext.datasets import synthetic


def test_user_error_is_one_line_with_exit_code_2(tmp_path):
    proc = subprocess.run(["nnunet-ext", "make-demo-dataset", "--raw", str(tmp_path), "--shape", "0", "4", "4"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["nnunet-ext make-demo-dataset: error: --shape needs 3 sizes "
                                        ">= 16 voxels (Z Y X), got 0 4 4. (--debug shows the traceback)"]
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback_and_bugs_always_do(tmp_path, monkeypatch, capsys):
    argv = ["make-demo-dataset", "--raw", str(tmp_path), "--num-test", "-1"]
    assert cli.main(argv) == 2
    assert "--num-test must be >= 0, got -1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--num-test must be >= 0"):
        cli.main([*argv, "--debug"])

    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(synthetic, "run", bug)
    with pytest.raises(KeyError, match="a bug"):  # the console script prints its traceback
        cli.main(["make-demo-dataset", "--raw", str(tmp_path)])
    assert cli.main(["evaluate", str(tmp_path), str(tmp_path), "-djfile", str(tmp_path / "dataset.json")]) == 2
    assert capsys.readouterr().err.startswith(f"nnunet-ext evaluate: error: {tmp_path / 'dataset.json'}: no such file")


@pytest.mark.parametrize("preprocess", [True, False])
def test_plan_hints_name_the_configurations_given_with_c(monkeypatch, capsys, preprocess):
    from nnunetv2.experiment_planning import plan_and_preprocess_api

    from nnunet_ext.commands import plan

    preprocessed = []
    monkeypatch.setattr(plan, "plan_dataset", lambda dataset_id, *args: "nnUNetGNPlans")
    monkeypatch.setattr(plan_and_preprocess_api, "preprocess",
                        lambda ids, plans, configurations, processes: preprocessed.append((ids, plans, configurations)))
    assert cli.main(["plan", "-d", "7", "-pl", "nnUNetPlannerGN", "-c", "2d", "3d_lowres",
                     *(["--preprocess"] if preprocess else [])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if "train with" in line] == [
        f"[nnunet-ext plan] train with: nnUNetv2_train 7 {c} 0 -p nnUNetGNPlans -tr EncDecTrainer"
        for c in ("2d", "3d_lowres")]
    assert preprocessed == ([([7], "nnUNetGNPlans", ["2d", "3d_lowres"])] if preprocess else [])
    assert not any("3d_fullres" in line for line in lines)
