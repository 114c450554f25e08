"""Every branch builds from planned encoders (plain, residual, anisotropic, 2D) and trains them."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.helper import get_matching_instancenorm
from torch import nn

from nnunet_ext.branches import BoundaryBranch, CPCBranch, VAEBranch, extract_subpatches
from nnunet_ext.branches.blocks import encode_to_stage, stage_at_stride
from nnunet_ext.nn import GroupNorm

IN_CHANNELS, NUM_TARGETS = 2, 3
ARCHS = {  # name: (unet class, conv_op, strides, kernel sizes, patch for VAE/boundary, patch for CPC)
    "plain3d": (PlainConvUNet, nn.Conv3d, [1, 2, 2, 2], 3, (16, 16, 16), (48, 48, 64)),
    "residual3d": (ResidualEncoderUNet, nn.Conv3d, [1, 2, 2, 2], 3, (16, 16, 16), (32, 48, 64)),
    "anisotropic3d": (PlainConvUNet, nn.Conv3d, [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
                      [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]], (8, 16, 24), (48, 64, 48)),  # predicts along y
    "plain2d": (PlainConvUNet, nn.Conv2d, [1, 2, 2, 2], 3, (32, 32), (48, 64)),
}


def build_encoder(arch: str, norm_op: type[nn.Module] | None = None) -> nn.Module:
    """Encoder of a tiny 4-stage U-Net (features 8..64), InstanceNorm unless ``norm_op`` is given."""
    unet, conv_op, strides, kernels = ARCHS[arch][:4]
    torch.manual_seed(0)
    net = unet(IN_CHANNELS, 4, [8, 16, 32, 64], conv_op, kernels, strides, 1, NUM_TARGETS, 1, True,
               norm_op or get_matching_instancenorm(conv_op), {"eps": 1e-5, "affine": True}, None, None,
               nn.LeakyReLU, {"inplace": True})
    return net.encoder


def structured_input(shape: tuple[int, ...], batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Piecewise-constant 'tissues' with per-channel intensity signatures plus noise."""
    g = torch.Generator().manual_seed(seed)
    field = F.interpolate(torch.randn(batch, 4, *(4,) * len(shape), generator=g), size=shape,
                          mode="trilinear" if len(shape) == 3 else "bilinear")
    x = (2 * torch.randn(4, IN_CHANNELS, generator=g))[field.argmax(1)].movedim(-1, 1)
    return x + 0.3 * torch.randn(x.shape, generator=g)


def run_branch(cls, arch: str, **kwargs):
    """Build ``cls`` for ``arch``, compute its loss on one image and backpropagate once."""
    cpc = cls is CPCBranch
    encoder = build_encoder(arch, GroupNorm if cpc else None)
    patch = ARCHS[arch][5 if cpc else 4]
    branch = cls.from_encoder(encoder, patch, IN_CHANNELS, NUM_TARGETS, **kwargs)
    x = structured_input(patch, batch=1)
    target = (F.avg_pool3d(x[:, :1], 3, 1, 1) if x.ndim == 5 else F.avg_pool2d(x[:, :1], 3, 1, 1)) > 0
    target = target.float().expand(-1, NUM_TARGETS, *patch) if cls.needs_target else None
    skips = encoder(x) if cls.needs_skips else None
    loss = branch(x, skips, target, encoder)
    loss.backward()
    return encoder, branch, loss


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("cls", [VAEBranch, BoundaryBranch, CPCBranch])
def test_branch_trains_encoder(cls, arch):
    encoder, branch, loss = run_branch(cls, arch)
    assert loss.ndim == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    for s, stage in enumerate(encoder.stages):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.parameters()), f"stage {s}"
    assert all(p.grad is not None for p in branch.parameters())
    assert sum(p.grad.abs().sum() for p in branch.parameters()) > 0
    assert not any(p is q for p in branch.parameters() for q in encoder.parameters())


@pytest.mark.parametrize(("arch", "patch"), [("plain3d", (20, 36, 28)), ("plain2d", (30, 44))])
def test_vae_reconstruction_matches_input_size_when_strides_do_not_divide(arch, patch):
    encoder = build_encoder(arch)
    branch = VAEBranch.from_encoder(encoder, patch, IN_CHANNELS, NUM_TARGETS)
    x = torch.randn(2, IN_CHANNELS, *patch)
    recon, mu, logvar = branch.reconstruct(x, encoder(x))
    assert recon.shape == x.shape and mu.shape == logvar.shape == (2, 128)


def test_vae_is_deterministic_in_eval_and_rejects_other_patch_sizes():
    encoder = build_encoder("plain3d")
    branch = VAEBranch.from_encoder(encoder, (32, 32, 32), IN_CHANNELS, NUM_TARGETS).eval()
    x = torch.randn(1, IN_CHANNELS, 32, 32, 32)
    skips = encoder(x)
    assert torch.equal(branch(x, skips, None, encoder), branch(x, skips, None, encoder))
    assert branch.weight == 0.1
    x = torch.randn(1, IN_CHANNELS, 48, 32, 32)
    with pytest.raises(ValueError, match="built for"):
        branch(x, encoder(x), None, encoder)


def test_boundary_branch_refuses_unlabeled_samples():
    encoder = build_encoder("plain2d")
    branch = BoundaryBranch.from_encoder(encoder, (32, 32), IN_CHANNELS, NUM_TARGETS)
    x = torch.randn(1, IN_CHANNELS, 32, 32)
    with pytest.raises(ValueError, match="labeled"):
        branch(x, encoder(x), None, encoder)


def test_cpc_warns_on_instancenorm_encoder_only():
    with pytest.warns(UserWarning, match="nnunet_ext.nn.GroupNorm"):
        CPCBranch.from_encoder(build_encoder("plain3d"), (48, 48, 64), IN_CHANNELS, NUM_TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CPCBranch.from_encoder(build_encoder("plain3d", GroupNorm), (48, 48, 64), IN_CHANNELS, NUM_TARGETS)
    with pytest.raises(ValueError, match=r"64 voxels along one axis.*\(48, 48, 48\).*along the last axis \(axis 2\)"):
        CPCBranch.from_encoder(build_encoder("plain3d", GroupNorm), (48, 48, 48), IN_CHANNELS, NUM_TARGETS)


def test_cpc_description_names_the_prediction_axis_and_positions():
    branch = CPCBranch.from_encoder(build_encoder("plain3d", GroupNorm), (48, 64, 48), IN_CHANNELS, NUM_TARGETS)
    assert branch.description((48, 64, 48)) == (
        "sub-patch vectors pooled from encoder stage 3 of 4 (stride 8x8x8); sub-patch grid (2, 3, 2) (32-voxel "
        "sub-patches, stride 16), prediction axis 1: context positions 0-0, "
        "skipped 1, targets 2-2; 12 candidates per prediction (chance 2.485)")
    assert "prediction axis 2: context positions 0-2, skipped 3, targets 4-6" in branch.description((144, 144, 128))


@pytest.mark.parametrize("strides, stage", [
    ([1, 2, 2, 2, 2, 2], 3),  # nnU-Net's default 6-stage 3d plan: stride 8 at stage 3 (paper: 1/8 resolution)
    ([1, 2, 2, 2], 3),  # shallower encoder reaching stride 8 at its deepest stage
    ([1, 2, 2], 2),  # shallower still: its deepest stage
    ([[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]], 3),  # anisotropic: (2, 8, 8), stage 3
    ([[2, 2], [2, 2], [2, 2], [2, 2]], 2),  # downsampling stem: stride 8 at stage 2
    ([[16, 16], [2, 2]], 0),  # nothing at or below 8: the first stage
])
def test_cpc_pools_the_deepest_stage_at_stride_8(strides, stage):
    ndim = 3 if isinstance(strides[0], int) or len(strides[0]) == 3 else 2
    per_stage = [[s] * ndim if isinstance(s, int) else s for s in strides]
    assert stage_at_stride(per_stage, 8) == stage


@pytest.mark.parametrize("unet", [PlainConvUNet, ResidualEncoderUNet])
def test_encode_to_stage_is_the_encoders_own_skip(unet):
    torch.manual_seed(0)
    encoder = unet(IN_CHANNELS, 5, [8, 16, 32, 32, 32], nn.Conv3d, 3, [1, 2, 2, 2, 2], 1, NUM_TARGETS, 1, True,
                   GroupNorm, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True}).encoder
    x = torch.randn(2, IN_CHANNELS, 32, 32, 32)
    skips = encoder(x)
    for stage in (0, 2, 4, -1):
        assert torch.equal(encode_to_stage(encoder, x, stage), skips[stage]), stage


@pytest.mark.parametrize("norm_op", [None, GroupNorm])
def test_cpc_trains_a_six_stage_encoder_without_reaching_its_one_voxel_stages(norm_op):
    """nnU-Net's default depth (total stride 32): a 32^3 sub-patch is one voxel at the bottleneck, where
    training-mode InstanceNorm raises; CPC stops at stage 3 (4^3 voxels per sub-patch)."""
    torch.manual_seed(0)
    encoder = PlainConvUNet(IN_CHANNELS, 6, [4, 8, 8, 16, 16, 16], nn.Conv3d, 3, [1, 2, 2, 2, 2, 2], 1, NUM_TARGETS,
                            1, True, norm_op or nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None,
                            nn.LeakyReLU, {"inplace": True}).encoder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the InstanceNorm warning is tested above
        branch = CPCBranch.from_encoder(encoder, (64, 64, 64), IN_CHANNELS, NUM_TARGETS)
    assert branch.stage == 3 and branch.context[-1].out_channels == 16
    loss = branch(structured_input((64, 64, 64)), None, None, encoder.train())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in encoder.stages[4:].parameters())  # the deeper stages never ran
    assert all(p.grad is not None for p in encoder.stages[:4].parameters())


def test_cpc_chunked_checkpointing_matches_single_call():
    encoder = build_encoder("plain2d", GroupNorm)
    x = structured_input((48, 64))
    full = CPCBranch.from_encoder(encoder, (48, 64), IN_CHANNELS, NUM_TARGETS)
    chunked = CPCBranch.from_encoder(encoder, (48, 64), IN_CHANNELS, NUM_TARGETS, chunk_size=5)
    chunked.load_state_dict(full.state_dict())
    losses, grads = [], []
    for branch in (full, chunked):
        encoder.zero_grad()
        losses.append(branch(x, None, None, encoder))
        losses[-1].backward()
        grads.append(torch.cat([p.grad.flatten() for p in encoder.parameters()]))
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_cpc_gradient_reaches_every_grid_vector():
    branch = CPCBranch.from_encoder(build_encoder("plain3d", GroupNorm), (48, 48, 64), IN_CHANNELS, NUM_TARGETS)
    z = torch.randn(2, 64, 2, 3, 4, requires_grad=True)  # context 0, skipped 1-2, target 3: all are candidates
    branch.grid_loss(z).backward()
    assert (z.grad.abs().sum(dim=(0, 1)) > 0).all()
    assert branch.context[-1].weight.grad.abs().sum() > 0


def between_subpatch_share(encoder: nn.Module, x: torch.Tensor) -> float:
    """Share of the deepest features' variance that lies between the mean-pooled sub-patch vectors."""
    with torch.no_grad():
        features = encoder(extract_subpatches(x))[-1]
    features = features.view(x.shape[0], -1, features.shape[1], features[0, 0].numel())  # B, G, D, voxels
    between = features.mean(3).var(1, unbiased=False).mean(0)  # per feature, across grid positions
    total = features.movedim(2, 0).flatten(1).var(1, unbiased=False)  # per feature, over everything
    return (between.sum() / total.sum()).item()


def test_cpc_pooled_vectors_differ_between_subpatches_with_groupnorm():
    x = structured_input((64, 64, 64))
    group = between_subpatch_share(build_encoder("plain3d", GroupNorm), x)
    instance = between_subpatch_share(build_encoder("plain3d"), x)
    print(f"between-sub-patch variance share: InstanceNorm {instance:.4%}, GroupNorm {group:.4%}")
    assert group > 0.005 and group > 5 * instance


@pytest.mark.parametrize("cls", [VAEBranch, BoundaryBranch, CPCBranch])
def test_loss_is_float32_under_autocast(cls):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, loss = run_branch(cls, "plain2d")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
