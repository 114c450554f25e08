"""The branch monitor measures what it says: per-part encoder gradient norms checked against hand-computed
gradients, probe steps spread over the epoch, means per epoch, records that survive ``--c``; and the branch
weight's ramp."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from nnunet_ext.trainers.cpc import (
    CPCSegCapTrainer,
    CPCSegTrainer,
    CPCSegZeroTrainer,
    ssCPCSegCapTrainer,
    ssCPCSegConstTrainer,
    ssCPCSegTrainer,
    ssCPCSegZeroTrainer,
)
from nnunet_ext.trainers.monitor import MONITOR_FILE, MONITOR_PLOT, BranchMonitor, accumulated_grad_norm, grad_norm
from nnunet_ext.trainers.multitask import BranchRule, MultiTaskLoss, MultiTaskOutput, MultiTaskTrainer
from nnunet_ext.trainers.names import is_semi_supervised, parse_trainer_name, trainer_class


class SumLoss(torch.nn.Module):
    def forward(self, output, target):
        return output.sum()


def test_grad_norm_is_the_norm_of_the_hand_computed_gradient():
    w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    v = torch.tensor([3.0], requires_grad=True)  # not in the loss: no gradient, counted as 0
    a = torch.tensor([3.0, 4.0, 12.0])
    loss = (w * a).sum() ** 2 / 2  # d/dw = (w.a) a
    expected = abs(float((w * a).sum().detach())) * 13.0
    assert grad_norm(loss, [w, v]) == pytest.approx(expected)
    assert grad_norm(loss, [w, v], scale=1024.0) == pytest.approx(expected)  # AMP's scale is undone
    assert w.grad is None  # measured, not accumulated: the real backward is still to come
    loss.backward()  # the graph was kept for it
    assert accumulated_grad_norm([w, v]) == pytest.approx(expected)
    assert accumulated_grad_norm([w, v], scale=2.0) == pytest.approx(expected / 2)


def test_multitask_loss_probes_each_applied_part_and_ramps_the_branch():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([6.0, 8.0])
    loss = MultiTaskLoss(SumLoss())
    loss.factor = 0.25
    loss.probe = ([w], 1.0)
    total = loss(MultiTaskOutput(w * a, (w * b).sum()), None)
    assert float(total) == pytest.approx(11.0 + 0.25 * 22.0)  # seg + factor * branch
    assert loss.last_probe == {"encoder_grad_segmentation": pytest.approx(5.0),
                               "encoder_grad_branch": pytest.approx(0.25 * 10.0)}
    assert float(loss.last["branch_loss"]) == pytest.approx(22.0)  # logged without the ramp
    assert loss.probe is None  # one probe per request
    loss(MultiTaskOutput(w * a, (w * b).sum()), None)
    assert loss.last_probe == {}
    plain = loss(w * a, None)  # validation output: nnU-Net's loss alone
    assert float(plain) == pytest.approx(11.0)


def test_probe_steps_are_spread_over_the_epoch():
    monitor = BranchMonitor(iterations_per_epoch=50, probes=5)
    assert [i for i in range(50) if monitor.is_probe(i)] == [0, 10, 20, 30, 40]
    few = BranchMonitor(iterations_per_epoch=3, probes=5)
    assert [i for i in range(3) if few.is_probe(i)] == [0, 1, 2]
    odd = BranchMonitor(iterations_per_epoch=250, probes=3)
    assert [i for i in range(250) if odd.is_probe(i)] == [0, 84, 168]
    assert not any(BranchMonitor(50, 0).is_probe(i) for i in range(50))


def test_epoch_records_are_means_and_a_resumed_epoch_replaces_its_record(tmp_path):
    monitor = BranchMonitor(iterations_per_epoch=4, probes=2)
    for step, (g, loss) in enumerate([(1.0, 2.0), (None, 1.0), (3.0, 0.0), (None, 1.0)]):
        monitor.add(encoder_grad_segmentation=g, branch_loss=loss, weight=0.1 * step)
    record = monitor.end_epoch(0, [0.5, 0.25])
    assert record == {"epoch": 0, "encoder_grad_segmentation": 2.0, "encoder_grad_segmentation_probes": 2,
                      "branch_loss": 1.0, "weight": pytest.approx(0.15), "pseudo_dice": [0.5, 0.25]}
    assert "segmentation 2" in monitor.summary(record) and "unweighted branch loss 1.0000" in monitor.summary(record)
    state = monitor.state_dict()
    monitor.add(branch_loss=9.0)
    monitor.end_epoch(1, None)
    resumed = BranchMonitor(4, 2)
    resumed.load_state_dict(state)
    resumed.add(branch_loss=5.0)  # epoch 1 again, after --c from the checkpoint of epoch 0
    resumed.end_epoch(1, None)
    assert [r["epoch"] for r in resumed.records] == [0, 1] and resumed.records[1]["branch_loss"] == 5.0
    resumed.write(str(tmp_path), {"trainer": "X", "fold": 0})
    written = json.load(open(tmp_path / MONITOR_FILE))
    assert written["probes_per_epoch"] == 2 and written["epochs"] == resumed.records and written["trainer"] == "X"
    assert os.path.getsize(tmp_path / MONITOR_PLOT) > 10_000  # four panels drawn
    assert sorted(os.listdir(tmp_path)) == sorted([MONITOR_FILE, MONITOR_PLOT])  # no temporary file left


def ramp_at(fraction: float, epoch: int, iteration: int) -> float:
    trainer = SimpleNamespace(num_epochs=10, num_iterations_per_epoch=50, current_epoch=epoch,
                              iteration_in_epoch=iteration, branch_rampup_fraction=fraction,
                              pull_cap_factor=lambda: 1.0)
    return MultiTaskTrainer.branch_weight_factor(trainer)


def test_branch_weight_ramps_over_its_share_of_the_steps():
    assert ramp_at(0.2, 0, 0) == pytest.approx(math.exp(-5))  # 100 ramp steps of 500
    assert ramp_at(0.2, 1, 0) == pytest.approx(math.exp(-5 * 0.5 ** 2))  # step 50 of 100
    assert ramp_at(0.2, 0, 50) == ramp_at(0.2, 1, 0)  # the step counts epochs and iterations alike
    assert ramp_at(0.2, 2, 0) == 1.0 and ramp_at(0.2, 9, 49) == 1.0
    assert ramp_at(0.0, 0, 0) == 1.0  # constant weight from the first step


def capped(cap, **pulls) -> float:
    trainer = SimpleNamespace(branch_pull_cap=cap, pulls={})
    MultiTaskTrainer.update_pulls(trainer, **pulls)
    return MultiTaskTrainer.pull_cap_factor(trainer)


def test_pull_cap_scales_the_branch_to_pull_at_most_cap_times_the_segmentation():
    # labeled 0.4 + unlabeled 0.4 per unit of weight against the segmentation's 0.1: factor 0.1 / 0.8
    assert capped(1.0, segmentation=0.1, branch=0.4, branch_unlabeled=0.4) == pytest.approx(0.125)
    assert capped(2.0, segmentation=0.1, branch=0.4) == pytest.approx(0.5)
    assert capped(1.0, segmentation=0.5, branch=0.4) == 1.0  # pulling less: never scaled up
    assert capped(None, segmentation=0.1, branch=0.4) == 1.0  # no cap
    assert capped(1.0, branch_unlabeled=0.4) == 1.0  # before the first labeled probe
    trainer = SimpleNamespace(branch_pull_cap=1.0, pulls={})
    MultiTaskTrainer.update_pulls(trainer, segmentation=0.1, branch=1.0)
    MultiTaskTrainer.update_pulls(trainer, segmentation=0.3, branch=1.0)  # running average: (0.1 + 0.3) / 2
    assert trainer.pulls == {"segmentation": pytest.approx(0.2), "branch": 1.0}
    assert MultiTaskTrainer.pull_cap_factor(trainer) == pytest.approx(0.2)


def test_cpcseg_keeps_the_papers_constant_and_sscpcseg_ramps_and_caps_with_the_constant_by_name():
    assert CPCSegTrainer.branch_rampup_fraction == ssCPCSegConstTrainer.branch_rampup_fraction == 0.0
    assert CPCSegTrainer.branch_pull_cap is ssCPCSegConstTrainer.branch_pull_cap is None
    for cls in (ssCPCSegTrainer, CPCSegCapTrainer, ssCPCSegCapTrainer):
        assert (cls.branch_rampup_fraction, cls.branch_pull_cap) == (0.2, 1.0), cls
    for cls in (CPCSegCapTrainer, ssCPCSegTrainer, ssCPCSegConstTrainer):
        assert cls.branch_kwargs == CPCSegTrainer.branch_kwargs  # only the rules differ
    assert is_semi_supervised("ssCPCSegConst") and is_semi_supervised("ssCPCSeg")
    cls = trainer_class("ssCPCSegCapTrainer_6labels_10epochs_s2")
    assert issubclass(cls, ssCPCSegCapTrainer) and cls.branch_pull_cap == 1.0
    cls = trainer_class("ssCPCSegConstTrainer_6labels_100unlabeled_s1")
    assert issubclass(cls, ssCPCSegConstTrainer) and cls.branch_pull_cap is None and cls.branch_rampup_fraction == 0
    assert trainer_class("ssCPCSegTrainer_6labels").branch_pull_cap == 1.0
    assert parse_trainer_name("CPCSegCapTrainer_3labels").base == "CPCSegCapTrainer"
    # a checkpoint of ssCPCSeg that records no rule was written when its default was the constant weight
    assert ssCPCSegTrainer.branch_rule_of_unrecorded_checkpoints == BranchRule(CPCSegTrainer.branch_kwargs["weight"])
    for cls in (CPCSegTrainer, ssCPCSegConstTrainer, ssCPCSegCapTrainer, CPCSegCapTrainer):
        assert cls.branch_rule_of_unrecorded_checkpoints is None, cls  # their rules never changed


def test_the_zero_control_is_cpcseg_with_weight_zero_and_nothing_else_changed():
    for control, model in ((CPCSegZeroTrainer, CPCSegTrainer), (ssCPCSegZeroTrainer, ssCPCSegConstTrainer)):
        assert issubclass(control, CPCSegTrainer) and control.branch_kwargs == {"weight": 0.0}
        assert (control.branch_rampup_fraction, control.branch_pull_cap, control.monitor_probes) == \
            (model.branch_rampup_fraction, model.branch_pull_cap, model.monitor_probes)
    assert is_semi_supervised("ssCPCSegZero") and not is_semi_supervised("CPCSegZero")
    cls = trainer_class("ssCPCSegZeroTrainer_6labels_10epochs_s2")
    assert issubclass(cls, ssCPCSegZeroTrainer) and cls.branch_kwargs == {"weight": 0.0}
    assert parse_trainer_name("CPCSegZeroTrainer_3labels_s1").base == "CPCSegZeroTrainer"
