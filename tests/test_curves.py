"""Training curves: the pseudo Dice nnU-Net logs per epoch, read from checkpoints, and the last-fifth summary."""

import json
import os

import numpy as np
import pytest
import torch

from nnunet_ext.evaluation import curves

REGIONS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}


def test_names_follow_nnunets_order_of_the_logged_dice():
    assert curves.foreground_names({"labels": REGIONS, "regions_class_order": [1, 2, 3]}) == \
        ["whole tumor", "tumor core", "enhancing tumor"]
    # labels: by value, whatever the dict order; the ignore label is not scored by nnU-Net's pseudo Dice
    labels = {"background": 0, "vessel": 2, "liver": 1, "ignore": 3}
    assert curves.foreground_names({"labels": labels}) == ["liver", "vessel"]


def test_fifths_and_changes_on_a_hand_made_curve():
    rising = np.arange(10) / 10  # last fifth: epochs 8-9 (0.85); the fifth before: 6-7 (0.65)
    flat = np.full(10, 0.5)
    late = np.r_[np.zeros(8), [0.9, np.nan]]  # ET appears in the last epochs; one epoch without ET logs NaN
    curve = curves.Curve("EncDec", 6, 2, 0, ("WT", "TC", "ET"), np.stack([rising, flat, late], 1))
    rows = {r["region"]: r for r in curves.plateau_rows([curve])}
    assert rows["WT"]["last_fifth"] == pytest.approx(0.85) and rows["WT"]["change"] == pytest.approx(0.2)
    assert rows["TC"]["last_fifth"] == pytest.approx(0.5) and rows["TC"]["change"] == pytest.approx(0.0)
    assert rows["ET"]["last_fifth"] == pytest.approx(0.9) and rows["ET"]["change"] == pytest.approx(0.9)
    mean = np.nanmean(curve.dice, 1)
    assert rows["mean"]["last_fifth"] == pytest.approx(np.mean(mean[-2:]))
    assert rows["WT"]["epochs"] == 10 and rows["WT"]["repeat"] == 2
    table = curves.plateau_table([curve])
    assert "| EncDec | 6 | 2 | 0 | 10 | 0.850 (+0.200) | 0.500 (+0.000) | 0.900 (+0.900) |" in table
    with pytest.raises(ValueError, match="1 epoch"):
        curves.fifths(np.ones(1))
    assert [len(p) for p in curves.fifths(np.arange(3))] == [1, 1]  # short runs still compare one epoch each
    one_epoch = curves.Curve("EncDec", 6, 0, 0, ("WT",), np.array([[0.3]]))  # a smoke run: nothing to compare
    assert "| EncDec | 6 | 0 | 0 | 1 | 0.300 (–) | 0.300 (–) |" in curves.plateau_table([one_epoch])


def write_checkpoint(folder, dice, name="checkpoint_final.pth"):
    os.makedirs(folder, exist_ok=True)
    torch.save({"logging": {"dice_per_class_or_region": [[np.float32(v) for v in row] for row in dice]},
                "current_epoch": len(dice)}, os.path.join(folder, name))


def test_read_curve_from_the_checkpoint_log(tmp_path):
    dice = [[0.1, 0.0, 0.0], [0.5, 0.2, 0.0], [0.8, 0.6, 0.3]]
    write_checkpoint(tmp_path / "final", dice)
    curve = curves.read_curve(str(tmp_path / "final"), ["WT", "TC", "ET"], "CPCSeg", 6, 1, 0)
    np.testing.assert_allclose(curve.dice, dice, rtol=1e-6)
    assert (curve.model, curve.epochs, curve.names) == ("CPCSeg", 3, ("WT", "TC", "ET"))
    write_checkpoint(tmp_path / "latest", dice[:2], "checkpoint_latest.pth")  # an unfinished fold: its latest
    assert curves.read_curve(str(tmp_path / "latest"), ["WT", "TC", "ET"], "CPCSeg", 6, 1, 0).epochs == 2
    assert curves.read_curve(str(tmp_path / "none"), ["WT"], "EncDec", 6, 0, 0) is None
    with pytest.raises(ValueError, match=r"checkpoint_final.pth: the logged pseudo Dice has shape \(3, 3\)"):
        curves.read_curve(str(tmp_path / "final"), ["WT", "TC"], "CPCSeg", 6, 1, 0)


def test_plot_draws_every_curve(tmp_path):
    a = curves.Curve("EncDec", 6, 0, 0, ("WT", "ET"), np.random.default_rng(0).random((12, 2)))
    b = curves.Curve("CPCSeg", 3, 0, 0, ("WT", "ET"), np.random.default_rng(1).random((12, 2)))
    path = curves.plot_curves([a, b], str(tmp_path / "curves.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert curves.plot_curves([], str(tmp_path / "none.png")) is None and not (tmp_path / "none.png").exists()


def test_study_reads_the_curves_of_its_trained_folds(tmp_path, monkeypatch, capsys):
    from nnunet_ext import study as study_module
    from nnunet_ext.pipeline import Experiment

    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    experiment = Experiment(1, "Dataset001_X", {"nnUNet_results": str(tmp_path)}, str(tmp_path / "logs"),
                            "nnUNetPlans", "2d", "cpu")
    study = study_module.Study(experiment, str(tmp_path / "raw"), str(tmp_path / "study"), [0, 1])
    cells = study_module.build_grid(["EncDec", "CPCSeg"], [6], repeats=2)
    trained = cells[0]
    folder = experiment.result_folder(trained.trainer)
    os.makedirs(folder)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"labels": REGIONS, "regions_class_order": [1, 2, 3]}, f)
    write_checkpoint(os.path.join(folder, "fold_1"), np.linspace(0, 1, 30).reshape(10, 3))
    damaged = experiment.result_folder(cells[1].trainer)  # the other repeat: a checkpoint torch cannot read
    os.makedirs(os.path.join(damaged, "fold_0"))
    with open(os.path.join(damaged, "dataset.json"), "w") as f:
        json.dump({"labels": REGIONS, "regions_class_order": [1, 2, 3]}, f)
    with open(os.path.join(damaged, "fold_0", "checkpoint_final.pth"), "wb") as f:
        f.write(b"not a checkpoint")
    found = study_module.training_curves(study, cells)
    assert [(c.model, c.repeat, c.fold, c.epochs) for c in found] == [("EncDec", trained.repeat, 1, 10)]
    assert f"{cells[1].name} fold 0: no training curve" in capsys.readouterr().out
    assert found[0].names == ("whole tumor", "tumor core", "enhancing tumor")
    os.makedirs(study.output)
    written = study_module.write_training_curves(study, cells)
    assert [os.path.basename(p) for p in written] == ["training_curves.md", "training_curves.png"]
    assert "| EncDec | 6 | 0 | 1 | 10 |" in open(written[0]).read()
