"""MultiTaskNetwork / MultiTaskLoss: plain inference, loss masking of unlabeled samples, DDP gradients."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_ext.branches import BoundaryBranch, CPCBranch, VAEBranch
from nnunet_ext.nn import GroupNorm
from nnunet_ext.trainers.multitask import BranchBatch, MultiTaskLoss, MultiTaskNetwork

PATCH = (32, 32, 64)  # CPC: grid (1, 1, 3)


def make_net(deep_supervision: bool = True) -> PlainConvUNet:
    torch.manual_seed(0)
    return PlainConvUNet(4, 3, (8, 16, 32), torch.nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), 3, (1, 1), True, GroupNorm,
                         {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU, {"inplace": True},
                         deep_supervision=deep_supervision)


def seg_loss() -> torch.nn.Module:
    loss = DC_and_BCE_loss({}, {"batch_dice": False, "do_bg": True, "smooth": 1e-5, "ddp": False},
                           use_ignore_label=False, dice_class=MemoryEfficientSoftDiceLoss)
    return DeepSupervisionWrapper(loss, [1.0, 0.5])


def targets(batch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    full = (torch.rand(batch, 3, *PATCH, generator=g) > 0.7).float()
    return [full, full[:, :, ::2, ::2, ::2]]


def test_eval_forward_is_the_plain_network_and_state_dict_loads_strictly():
    net = make_net(deep_supervision=False)
    mt = MultiTaskNetwork(net, VAEBranch.from_encoder(net.encoder, PATCH, 4, 3)).eval()
    x = torch.randn(1, 4, *PATCH)
    mt.pending = BranchBatch(None)
    with torch.no_grad():
        assert torch.equal(mt(x), net(x))  # eval mode ignores pending branch input
    fresh = make_net(deep_supervision=False)
    fresh.load_state_dict(mt.state_dict(), strict=True)
    assert not any(k.startswith("branch") for k in mt.state_dict())
    assert any(n.startswith("branch.") for n, _ in mt.named_parameters())  # optimizer and DDP see the branch


def test_branch_loss_of_unlabeled_images_runs_encoder_and_branch_only():
    net = make_net()
    mt = MultiTaskNetwork(net, CPCBranch.from_encoder(net.encoder, PATCH, 4, 3)).train()
    x = torch.randn(2, 4, *PATCH)
    loss = mt.branch_loss(x)
    assert loss.item() == pytest.approx(mt.branch(x, None, None, net.encoder).item(), rel=1e-6)
    loss.backward()
    decoder_own = [p for n, p in net.decoder.named_parameters() if not n.startswith("encoder.")]
    assert decoder_own and all(p.grad is None for p in decoder_own)
    assert all(p.grad is not None for p in net.encoder.parameters())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _branch(kind: str, net):
    if kind == "cpc":
        return CPCBranch.from_encoder(net.encoder, PATCH, 4, 3, weight=0.5)
    return BoundaryBranch.from_encoder(net.encoder, PATCH, 4, 3)


def _grads(kind: str, x, t, world: int = 1, rank: int = 0) -> dict[str, torch.Tensor]:
    net = make_net()
    model = MultiTaskNetwork(net, _branch(kind, net)).train()
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    model.pending = BranchBatch(t[0] if kind == "boundary" else None)
    MultiTaskLoss(seg_loss())(wrapped(x), t).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_gradient(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """Equal up to float32 summation order: each tensor within 2 % of its largest reference entry (DDP's
    reduction measured at most 0.4 %)."""
    assert grads.keys() == reference.keys()
    for name, g in grads.items():
        assert (g - reference[name]).abs().max() <= 0.02 * reference[name].abs().max() + 1e-7, name


def _ddp_worker(rank: int, world: int, port: int, kind: str, x, t, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    part = slice(rank, rank + 1)
    grads = _grads(kind, x[part], [s[part] for s in t], world, rank)
    torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["cpc", "boundary"])
def test_ddp_gradients_match_single_process(kind, tmp_path):
    """gloo DDP with 2 processes x 1 sample == one process on the concatenated batch of 2."""
    torch.manual_seed(3)
    x = torch.randn(2, 4, *PATCH)
    t = targets(2, 5)
    reference = _grads(kind, x, t)
    mp.spawn(_ddp_worker, args=(2, _free_port(), kind, x, t, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"rank{rank}.pt")
        assert grads.keys() == reference.keys()
        assert_same_gradient(grads, reference)
    assert any(n.startswith("branch.") and g.abs().sum() > 0 for n, g in reference.items())
    assert any(n.startswith("net.encoder") and g.abs().sum() > 0 for n, g in reference.items())


@pytest.mark.parametrize("branch_cls", [VAEBranch, BoundaryBranch, CPCBranch])
def test_mixed_precision_and_compile_keep_working(branch_cls):
    """Autocast (bfloat16 on CPU, as nnU-Net autocasts on CUDA) and torch.compile through the wrapper."""
    net = make_net()
    mt = MultiTaskNetwork(net, branch_cls.from_encoder(net.encoder, PATCH, 4, 3)).train()
    compiled = torch.compile(mt, backend="aot_eager")
    loss_fn = MultiTaskLoss(seg_loss())
    x, t = torch.randn(2, 4, *PATCH), targets(2, 0)
    for _ in range(2):  # second step reuses the compiled graph
        mt.pending = BranchBatch(t[0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = compiled(x)
            total = loss_fn(out, t)
        assert out.branch_loss.dtype == torch.float32 and torch.isfinite(total)
        total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mt.parameters())
    mt.eval()
    with torch.no_grad():
        assert isinstance(compiled(x), (list, tuple))  # plain segmentation at inference


def test_planned_chunk_size_keeps_cpc_within_the_planned_activations():
    from nnunet_ext.branches.cpc import default_chunk_size, planned_chunk_size

    assert planned_chunk_size((128, 128, 128), 2) == 128  # 686 sub-patches in 6 chunks of <= 2 patches' voxels
    assert default_chunk_size(torch.device("cuda"), (128, 128, 128), 2) == 128  # the trainer's and benchmark's
    assert default_chunk_size(torch.device("cpu"), (128, 128, 128), 2) is None
    assert planned_chunk_size((48, 48, 64), 2) == 9
    assert planned_chunk_size((48, 64), 64) == 192
    for patch, batch in (((128, 128, 128), 2), ((160, 192, 128), 2), ((64, 64, 64), 4), ((48, 48, 64), 2)):
        assert planned_chunk_size(patch, batch) * 32 ** 3 <= batch * np.prod(patch)


def test_checkpoint_appears_only_with_its_branch(tmp_path, monkeypatch):
    """save_checkpoint never leaves ``filename`` without ``branch_weights``, even for an instant: a run killed
    between nnU-Net's write and ours must keep a checkpoint that ``--c`` can resume."""
    from types import SimpleNamespace

    from nnunet_ext.trainers.monitor import BranchMonitor
    from nnunet_ext.trainers.multitask import MultiTaskTrainer

    net = make_net()
    trainer = object.__new__(MultiTaskTrainer)
    trainer.__dict__.update(
        local_rank=0, disable_checkpointing=False, is_ddp=False, grad_scaler=None,
        logger=SimpleNamespace(get_checkpoint=dict), _best_ema=None, current_epoch=0, my_init_kwargs={},
        inference_allowed_mirroring_axes=None, monitor=BranchMonitor(1, 0), pulls={},
        network=MultiTaskNetwork(net, VAEBranch.from_encoder(net.encoder, PATCH, 4, 3)))
    trainer.optimizer = torch.optim.SGD(trainer.network.parameters(), lr=0.1)
    target = str(tmp_path / "checkpoint_best.pth")
    seen = []
    real_save = torch.save

    def watching_save(obj, f, *args, **kwargs):
        if os.path.isfile(target):  # whatever is at the target while anything is written must be complete
            seen.append("branch_weights" in torch.load(target, map_location="cpu", weights_only=False))
        assert str(f) != target, "the checkpoint must be written elsewhere and moved into place"
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", watching_save)
    trainer.save_checkpoint(target)
    trainer.save_checkpoint(target)  # a second save replaces a complete file with a complete file
    saved = torch.load(target, map_location="cpu", weights_only=False)
    assert saved["branch_class"] == "VAEBranch" and set(saved["branch_weights"]) == set(
        trainer.multitask_network.branch.state_dict())
    assert seen and all(seen)
    assert os.listdir(tmp_path) == ["checkpoint_best.pth"]


def test_a_checkpoint_resumes_only_under_the_branch_rule_it_recorded():
    """The branch rule (weight, ramp, cap) rides in the checkpoint; a trainer whose rule differs from the recorded one
    (or, for a checkpoint that records none, from the rule its class declares for such checkpoints) refuses to
    continue it, naming both rules; the same rule continues."""
    from nnunet_ext.trainers.monitor import BranchMonitor
    from nnunet_ext.trainers.multitask import BranchRule, BranchRuleMismatchError, MultiTaskTrainer

    net = make_net()
    network = MultiTaskNetwork(net, VAEBranch.from_encoder(net.encoder, PATCH, 4, 3, weight=0.1))

    def trainer(rampup: float = 0.0, cap: float | None = None, unrecorded: BranchRule | None = None,
                weight: float = 0.1, epoch: int = 3):
        cls = type("RuleTrainer", (MultiTaskTrainer,), {"branch_rampup_fraction": rampup, "branch_pull_cap": cap,
                                                         "branch_rule_of_unrecorded_checkpoints": unrecorded,
                                                         "branch_kwargs": {"weight": weight}})
        net = make_net()
        t = object.__new__(cls)
        t.__dict__.update(monitor=BranchMonitor(1, 0), pulls={}, current_epoch=epoch, num_epochs=10, network=(
            network if weight == 0.1 else MultiTaskNetwork(net, VAEBranch.from_encoder(net.encoder, PATCH, 4, 3,
                                                                                         weight=weight))))
        return t

    saved = trainer(0.2, 1.0).checkpoint_extras()
    assert saved["branch_rule"] == {"weight": 0.1, "rampup_fraction": 0.2, "pull_cap": 1.0}
    same = trainer(0.2, 1.0)
    same.restore_checkpoint_extras(saved, "ckpt.pth")
    same.check_resumed_rule()  # its own rule: continues
    assert type(same).follows(BranchRule(0.1, 0.2, 1.0)) and not type(same).follows(BranchRule(0.2, 0.2, 1.0))
    for other in (trainer(), trainer(0.2), trainer(0.2, 2.0), trainer(0.2, 1.0, weight=0.2)):
        other.restore_checkpoint_extras(saved, "fold_0/ckpt.pth")
        with pytest.raises(BranchRuleMismatchError, match="fold_0/ckpt.pth was trained with branch weight 0.1, "
                                                          "ramped up over the first 20% of the steps, pull on the "
                                                          "encoder capped at 1x the segmentation loss's, but "
                                                          "RuleTrainer now trains with weight 0.[12], "):
            other.check_resumed_rule()
    unrecorded = {k: v for k, v in saved.items() if k != "branch_rule"}  # written before rules were recorded
    plain = trainer(0.2, 1.0)
    plain.restore_checkpoint_extras(unrecorded, "ckpt.pth")
    plain.check_resumed_rule()  # nothing declared: the class's rule never changed
    changed = trainer(0.2, 1.0, unrecorded=BranchRule(0.1))
    changed.restore_checkpoint_extras(unrecorded, "ckpt.pth")
    with pytest.raises(BranchRuleMismatchError, match="trained with branch weight 0.1, constant from the first step"):
        changed.check_resumed_rule()
    finished = trainer(0.2, 1.0, unrecorded=BranchRule(0.1), epoch=10)  # --c of a finished run trains nothing
    finished.restore_checkpoint_extras(unrecorded, "ckpt.pth")
    finished.check_resumed_rule()
    assert finished.checkpoint_extras()["branch_rule"] == {"weight": 0.1, "rampup_fraction": 0.0, "pull_cap": None}


def test_a_cpc_branch_of_weight_zero_adds_no_gradient_and_one_of_weight_half_does():
    """CPCSegZeroTrainer's premise: with weight 0 the branch runs but every parameter gets exactly the gradient of the
    segmentation loss alone (the branch's own ones 0); the same branch at weight 0.5 changes the encoder's."""
    x, t = torch.randn(2, 4, *PATCH), targets(2, seed=1)
    reference = make_net()
    seg_loss()(reference.train()(x), t).backward()

    def step(weight: float) -> tuple[dict[str, torch.Tensor], MultiTaskNetwork]:
        net = make_net()
        model = MultiTaskNetwork(net, CPCBranch.from_encoder(net.encoder, PATCH, 4, 3, weight=weight)).train()
        model.pending = BranchBatch(None)
        MultiTaskLoss(seg_loss())(model(x), t).backward()
        return {n: p.grad for n, p in net.named_parameters()}, model

    zero, model = step(0.0)
    assert all(torch.equal(zero[n], p.grad) for n, p in reference.named_parameters())
    assert all(p.grad is None or not p.grad.any() for p in model.branch.parameters())
    half, _ = step(0.5)
    assert not all(torch.equal(half[n], p.grad) for n, p in reference.encoder.named_parameters(prefix="encoder"))
