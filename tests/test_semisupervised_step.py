"""The semi-supervised step: nnU-Net's labeled batch plus one unlabeled batch, accumulated into one optimizer
step (one clip, one step), the unlabeled graph freed before the labeled forward; also under gloo DDP."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_multitask import PATCH, _free_port, assert_same_gradient, make_net, seg_loss, targets

from nnunet_ext.branches import CPCBranch
from nnunet_ext.compat import CompatibilityError, after_zero_grad
from nnunet_ext.trainers.cpc import ssCPCSegTrainer
from nnunet_ext.trainers.monitor import BranchMonitor
from nnunet_ext.trainers.multitask import BranchBatch, MultiTaskLoss, MultiTaskNetwork


def make_model() -> MultiTaskNetwork:
    net = make_net()
    torch.manual_seed(1)
    return MultiTaskNetwork(net, CPCBranch.from_encoder(net.encoder, PATCH, 4, 3, weight=0.5)).train()


def make_trainer(network: torch.nn.Module, unlabeled: torch.Tensor) -> ssCPCSegTrainer:
    """An ssCPCSegTrainer with just what nnU-Net's train_step uses (CPU, no AMP)."""
    trainer = object.__new__(ssCPCSegTrainer)
    trainer.__dict__.update(device=torch.device("cpu"), grad_scaler=None, network=network,
                            loss=MultiTaskLoss(seg_loss()), dataloader_unlabeled=iter([{"data": unlabeled}]),
                            num_epochs=1, num_iterations_per_epoch=1, current_epoch=0, iteration_in_epoch=0,
                            pulls={}, monitor=BranchMonitor(1, 0))  # one step, no probe: factor 1
    trainer.optimizer = torch.optim.SGD(network.parameters(), lr=0.0)
    return trainer


def step_gradients(trainer: ssCPCSegTrainer, data: torch.Tensor, target: list[torch.Tensor]) -> dict:
    """Run the trainer's train_step; return the gradients the optimizer steps with (after clipping)."""
    seen = {}
    model = trainer.multitask_network
    trainer.optimizer.register_step_pre_hook(
        lambda *_: seen.update({n: p.grad.clone() for n, p in model.named_parameters()}))
    result = trainer.train_step({"data": data, "target": target})
    assert {"loss", "seg_loss", "branch_loss", "unlabeled_branch_loss"} <= set(result)
    return seen


def combined_pass_gradients(model: MultiTaskNetwork, data, target, unlabeled) -> dict:
    """Reference: one graph holding both passes, one backward, nnU-Net's clip."""
    model.zero_grad(set_to_none=True)
    model.pending = BranchBatch(None)
    total = MultiTaskLoss(seg_loss())(model(data), target) + model.branch_loss(unlabeled)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 12)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_step_gradient_is_the_sum_of_both_passes_with_one_clip_and_one_step(monkeypatch):
    torch.manual_seed(2)
    data, unlabeled, target = torch.randn(2, 4, *PATCH), torch.randn(2, 4, *PATCH), targets(2, 0)
    model = make_model()
    reference = combined_pass_gradients(copy.deepcopy(model), data, target, unlabeled)
    trainer = make_trainer(model, unlabeled)
    clips, steps, order = [], [], []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: clips.append(1) or real_clip(*a, **k))
    trainer.optimizer.register_step_post_hook(lambda *_: steps.append(1))
    # the labeled forward (the only pass that runs the decoder) starts after the unlabeled backward is done,
    # i.e. the unlabeled graph is already freed: peak memory is that of one pass
    model.net.decoder.register_forward_pre_hook(
        lambda *_: order.append(all(p.grad is not None for p in model.net.encoder.parameters())))
    grads = step_gradients(trainer, data, target)
    assert clips == [1] and steps == [1] and order == [True]
    assert grads.keys() == reference.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, reference[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(n.startswith("branch.") and g.abs().sum() > 0 for n, g in grads.items())


def test_unlabeled_pass_changes_the_step():
    """The unlabeled batch really contributes: other unlabeled images, other gradient."""
    torch.manual_seed(3)
    data, target = torch.randn(2, 4, *PATCH), targets(2, 0)
    first, second = torch.randn(2, 4, *PATCH), torch.randn(2, 4, *PATCH)
    a = step_gradients(make_trainer(make_model(), first), data, target)
    b = step_gradients(make_trainer(make_model(), second), data, target)
    assert any(not torch.equal(a[n], b[n]) for n in a if n.startswith("net.encoder"))


def test_after_zero_grad_runs_once_and_checks_nnunet_calls_zero_grad_once():
    param = torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    ran = []
    with after_zero_grad(optimizer, lambda: ran.append(param.grad)):
        param.grad = torch.ones(1)
        optimizer.zero_grad(set_to_none=True)
    assert ran == [None] and "zero_grad" not in vars(optimizer)  # ran after clearing; original restored
    with pytest.raises(CompatibilityError, match="after_zero_grad.*called 0 times"):
        with after_zero_grad(optimizer, lambda: None):
            pass
    with pytest.raises(CompatibilityError, match="called 2 times"):
        with after_zero_grad(optimizer, lambda: None):
            optimizer.zero_grad()
            optimizer.zero_grad()


def _ddp_worker(rank: int, world: int, port: int, data, target, unlabeled, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    part = slice(rank, rank + 1)
    trainer = make_trainer(torch.nn.parallel.DistributedDataParallel(make_model()), unlabeled[part])
    grads = step_gradients(trainer, data[part], [t[part] for t in target])
    torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_step_matches_single_process(tmp_path):
    """gloo DDP, 2 processes x (1 labeled + 1 unlabeled) == one process with 2 + 2: the locally accumulated
    unlabeled gradient is averaged together with the labeled one."""
    torch.manual_seed(4)
    data, unlabeled, target = torch.randn(2, 4, *PATCH), torch.randn(2, 4, *PATCH), targets(2, 5)
    reference = step_gradients(make_trainer(make_model(), unlabeled), data, target)
    mp.spawn(_ddp_worker, args=(2, _free_port(), data, target, unlabeled, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        # the unlabeled pass changes every encoder weight's gradient by at least 40 % (measured), so a DDP
        # step that lost the locally accumulated unlabeled gradient fails here
        assert_same_gradient(torch.load(tmp_path / f"rank{rank}.pt"), reference)
