"""End to end through the real CLI: branch and semi-supervised trainers train, resume, predict, ensemble;
checkpoints load into stock nnU-Net; the unlabeled pool never holds validation or test cases."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time

import pytest
import torch
from conftest import check_predictions, predict, run

pytestmark = pytest.mark.slow
SHORT = "1epochs_4iters_noMirroring"


def train(ds, trainer: str, fold: int = 0, *extra: str) -> subprocess.CompletedProcess:
    return run(["nnUNetv2_train", str(ds["id"]), "3d_fullres", str(fold), "-p", ds["plans"], "-tr", trainer,
                "-device", "cpu", *extra], ds["env"])


def fold_dir(ds, trainer: str, fold: int = 0) -> str:
    return os.path.join(ds["results"], f"{trainer}__{ds['plans']}__3d_fullres", f"fold_{fold}")


def branch_losses(folder: str) -> list[float]:
    log = next(f for f in sorted(os.listdir(folder)) if f.startswith("training_log"))
    return [float(m) for m in re.findall(r"branch_loss ([0-9.]+)", open(os.path.join(folder, log)).read())]


def load_into_stock_network(ds, checkpoint: dict) -> None:
    """network_weights load strictly into the network a stock nnUNetTrainer builds from the plans."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(os.path.join(ds["preprocessed"], f"{ds['plans']}.json"))
    cm = pm.get_configuration("3d_fullres")
    net = nnUNetTrainer.build_network_architecture(pm, cm, 4, 3, enable_deep_supervision=False)
    net.load_state_dict(checkpoint["network_weights"], strict=True)


@pytest.mark.parametrize("base", ["VAESegTrainer", "BoundSegTrainer", "CPCSegTrainer"])
def test_branch_trainer_train_resume_predict(branch_dataset, base, tmp_path):
    ds = branch_dataset
    trainer = f"{base}_3labels_{SHORT}"
    train(ds, trainer)
    folder = fold_dir(ds, trainer)
    final = os.path.join(folder, "checkpoint_final.pth")
    before = torch.load(final, map_location="cpu", weights_only=False)
    assert before["branch_weights"] and len(branch_losses(folder)) == 1
    load_into_stock_network(ds, before)
    # --c on a finished run loads the checkpoint (branch included) and re-saves it unchanged
    train(ds, trainer, 0, "--c")
    after = torch.load(final, map_location="cpu", weights_only=False)
    for key, value in before["branch_weights"].items():
        assert torch.equal(value, after["branch_weights"][key]), key
    predict(ds, trainer, [0], str(tmp_path / "pred"))
    check_predictions(ds, str(tmp_path / "pred"))


def test_cpc_loss_falls_below_chance(branch_dataset):
    """On the demo data InfoNCE drops clearly below chance (ln of the candidates per prediction)."""
    from nnunet_ext.branches.cpc import cpc_grid
    from nnunet_ext.trainers.cpc import CPCSegTrainer

    ds = branch_dataset
    trainer = "CPCSegTrainer_3labels_4epochs_10iters_noMirroring"
    train(ds, trainer)
    plans = json.load(open(os.path.join(ds["preprocessed"], f"{ds['plans']}.json")))
    candidates = math.prod(cpc_grid(plans["configurations"]["3d_fullres"]["patch_size"]))
    chance = CPCSegTrainer.branch_kwargs["weight"] * math.log(candidates)
    losses = branch_losses(fold_dir(ds, trainer))
    assert len(losses) == 4 and losses[-1] < 0.8 * chance, (losses, chance)


def test_interrupted_training_resumes_with_c(branch_dataset):
    """Kill a run after its first checkpoint; --c resumes from it and finishes the schedule."""
    ds = branch_dataset
    trainer = "ssCPCSegTrainer_3labels_3epochs_4iters_noMirroring"
    folder = fold_dir(ds, trainer)
    cmd = ["nnUNetv2_train", str(ds["id"]), "3d_fullres", "0", "-p", ds["plans"], "-tr", trainer, "-device", "cpu"]
    proc = subprocess.Popen(cmd, env=ds["env"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        checkpoint = os.path.join(folder, "checkpoint_best.pth")
        for _ in range(600):
            if os.path.isfile(checkpoint) or proc.poll() is not None:
                break
            time.sleep(0.5)
    finally:
        proc.kill()
        proc.wait()
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert "branch_weights" in saved and not os.path.isfile(os.path.join(folder, "checkpoint_final.pth"))
    out = train(ds, trainer, 0, "--c").stdout
    assert re.search(rf": Epoch {saved['current_epoch']}$", out, re.M)  # continues where it stopped
    assert re.search(r": Epoch 0$", out, re.M) is None
    final = torch.load(os.path.join(folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 3
    from nnunet_ext.branches.cpc import cpc_grid

    patch = json.load(open(os.path.join(ds["preprocessed"], f"{ds['plans']}.json")))["configurations"]["3d_fullres"][
        "patch_size"]
    # the branch monitor continues its curves: the checkpoint's records kept, one record per epoch, every part
    monitor = json.load(open(os.path.join(folder, "branch_monitor.json")))
    assert [r["epoch"] for r in monitor["epochs"]] == [0, 1, 2]
    assert monitor["names"] == ["whole tumor", "tumor core", "enhancing tumor"]  # nnU-Net's order of pseudo Dice
    assert final["branch_monitor"]["records"] == monitor["epochs"]
    kept = saved["branch_monitor"]["records"]
    assert kept and monitor["epochs"][:len(kept)] == kept
    for record in monitor["epochs"]:
        for part in ("segmentation", "branch", "branch_unlabeled"):  # 4 iterations: every step probes
            assert record[f"encoder_grad_{part}"] > 0 and record[f"encoder_grad_{part}_probes"] == 4
        assert record["chance"] == pytest.approx(math.log(math.prod(cpc_grid(patch))))
        assert record["branch_loss"] > 0 and record["branch_loss_unlabeled"] > 0 and len(record["pseudo_dice"]) == 3
    assert os.path.isfile(os.path.join(folder, "branch_progress.png"))


def test_a_checkpoint_trained_under_another_branch_rule_is_neither_continued_nor_studied(branch_dataset):
    """ssCPCSeg's default changed from the paper's constant weight to the ramp and pull cap. An ssCPCSeg checkpoint
    written before checkpoints recorded their rule (so: the constant weight) is not continued by ``--c`` (refused by
    name, nothing written); a finished one still completes an interrupted final validation with ``--c`` and keeps
    its rule on record, and the study refuses to count it as a trained ssCPCSeg fold."""
    from nnunet_ext.pipeline import check_trained_rule
    from nnunet_ext.trainers.multitask import BranchRuleMismatchError

    ds = branch_dataset
    trainer = "ssCPCSegTrainer_3labels_2epochs_2iters_noMirroring"
    train(ds, trainer)
    folder = fold_dir(ds, trainer)
    final = os.path.join(folder, "checkpoint_final.pth")
    checkpoint = torch.load(final, map_location="cpu", weights_only=False)
    assert checkpoint["branch_rule"] == {"weight": 0.05, "rampup_fraction": 0.2, "pull_cap": 1.0}
    check_trained_rule(trainer, final)  # its own rule: a trained fold
    del checkpoint["branch_rule"]  # as an earlier version wrote it
    torch.save(checkpoint, final)
    train(ds, trainer, 0, "--c")  # finished: nothing to train, the final validation runs again
    constant = {"weight": 0.05, "rampup_fraction": 0.0, "pull_cap": None}
    assert torch.load(final, map_location="cpu", weights_only=False)["branch_rule"] == constant
    with pytest.raises(BranchRuleMismatchError, match=f"{final} was trained with branch weight 0.05, constant from "
                                                      f"the first step, but {trainer} now trains with another rule"):
        check_trained_rule(trainer, final)
    checkpoint.update(current_epoch=1)  # unfinished: stopped after its first of 2 epochs
    latest = os.path.join(folder, "checkpoint_latest.pth")
    torch.save(checkpoint, latest)
    os.remove(final)
    mtime = os.path.getmtime(latest)
    cmd = ["nnUNetv2_train", str(ds["id"]), "3d_fullres", "0", "-p", ds["plans"], "-tr", trainer, "-device", "cpu"]
    proc = subprocess.run([*cmd, "--c"], env=ds["env"], capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert (f"{latest} was trained with branch weight 0.05, constant from the first step, but {trainer} now trains "
            f"with weight 0.05, ramped up over the first 20% of the steps, pull on the encoder capped at 1x the "
            f"segmentation loss's") in proc.stderr
    assert "ssCPCSegConstTrainer" in proc.stderr and os.path.getmtime(latest) == mtime
    assert not os.path.exists(final)


@pytest.mark.parametrize("trainer, expected", [
    (f"ssVAESegTrainer_3labels_{SHORT}", None),
    (f"ssCPCSegTrainer_3labels_8unlabeled_{SHORT}", 8),
])
def test_semi_supervised_train_predict_ensemble(branch_dataset, trainer, expected, tmp_path):
    ds = branch_dataset
    per_fold = []
    for fold in (0, 1):
        train(ds, trainer, fold)
        info = json.load(open(os.path.join(fold_dir(ds, trainer, fold), "unlabeled_cases.json")))
        forbidden = set(ds["splits"][fold]["val"]) | {k for k, v in ds["leaks"].items() if v == "test"}
        assert not forbidden & set(info["unlabeled"])
        labeled = json.load(open(os.path.join(fold_dir(ds, trainer, fold), "labeled_cases.json")))["labeled"]
        assert not set(labeled) & set(info["unlabeled"])
        for leak, original in ds["leaks"].items():  # leaking copies are excluded and reported
            if original == "test" or original in ds["splits"][fold]["val"]:
                assert leak in info["excluded"] and leak not in info["unlabeled"]
        if expected:
            assert len(info["unlabeled"]) == expected
        assert "imagesUnlabeled" in info["source"].values()
        out = str(tmp_path / f"f{fold}")
        predict(ds, trainer, [fold], out, "--save_probabilities")
        per_fold.append(out)
    train(ds, trainer, 1, "--c")  # resume of a finished run
    run(["nnUNetv2_ensemble", "-i", *per_fold, "-o", str(tmp_path / "ens"), "-np", "1"], ds["env"])
    check_predictions(ds, str(tmp_path / "ens"))


def test_too_many_unlabeled_fails_clearly(branch_dataset):
    ds = branch_dataset
    proc = subprocess.run(["nnUNetv2_train", str(ds["id"]), "3d_fullres", "0", "-p", ds["plans"], "-tr",
                           f"ssVAESegTrainer_3labels_500unlabeled_{SHORT}", "-device", "cpu"], env=ds["env"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "500 unlabeled images requested but the pool has only" in proc.stderr
