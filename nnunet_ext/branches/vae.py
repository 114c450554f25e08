"""VAE regularization branch (paper Table S1): reconstruct the input from the bottleneck through a 128-d latent."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_ext.branches.base import Branch
from nnunet_ext.branches.blocks import EncoderSpec, ResBlock, conv1x1, resize
from nnunet_ext.nn import GroupNorm


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per latent element, 0.5 (mu^2 + sigma^2 - log sigma^2 - 1), averaged
    over all elements (batch and latent dimensions)."""
    return 0.5 * (mu.square() + logvar.exp() - logvar - 1).mean()


class VAEBranch(Branch):
    """Variational auto-encoder on the bottleneck; loss ``weight * (MSE(recon, x) + KL)``.

    Layout (Table S1, generalised to any planned encoder): GN-ReLU-Conv(16, stride 2) on the bottleneck ->
    Dense -> mu, log-variance (``latent_dim`` each) -> sample (mu in eval mode) -> Dense -> ReLU -> reshape to
    16 channels at half the bottleneck size -> Conv1x1 to the bottleneck channels -> linear upsampling to
    the bottleneck size; then per encoder stage, deepest-1 down to 0: Conv1x1 to the stage's channels,
    linear upsampling to the stage's size, ResBlock; finally upsampling to the input size and Conv1x1 to
    the input channels. Upsampling targets the sizes of the actual skips, so anisotropic strides and
    sizes that do not divide evenly are handled. MSE is averaged over all voxels and channels, KL over
    all latent elements (see ``kl_standard_normal``).
    """

    needs_target = False
    needs_skips = True

    def __init__(self, spec: EncoderSpec, patch_size: Sequence[int], input_channels: int,
                 latent_dim: int = 128, reduced_channels: int = 16, weight: float = 0.1):
        super().__init__(weight)
        if len(patch_size) != spec.ndim:
            raise ValueError(f"patch_size {tuple(patch_size)} has {len(patch_size)} axes but the encoder is "
                             f"{spec.ndim}D; pass the configuration's patch_size")
        conv, ch = spec.conv_op, spec.channels
        self.bottleneck_shape = spec.stage_shapes(patch_size)[-1]
        self.reduced_shape = tuple(math.ceil(s / 2) for s in self.bottleneck_shape)
        self.reduced_channels = reduced_channels
        n_reduced = reduced_channels * math.prod(self.reduced_shape)
        self.reduce = nn.Sequential(GroupNorm(ch[-1]), nn.ReLU(inplace=True),
                                    conv(ch[-1], reduced_channels, kernel_size=3, stride=2, padding=1))
        self.to_moments = nn.Linear(n_reduced, 2 * latent_dim)
        self.from_latent = nn.Sequential(nn.Linear(latent_dim, n_reduced), nn.ReLU(inplace=True))
        self.expand = conv1x1(conv, reduced_channels, ch[-1])
        stages = range(len(ch) - 2, -1, -1)
        self.up_convs = nn.ModuleList(conv1x1(conv, ch[s + 1], ch[s]) for s in stages)
        self.blocks = nn.ModuleList(ResBlock(conv, ch[s], spec.kernel_sizes[s]) for s in stages)
        self.out = conv1x1(conv, ch[0], input_channels)

    @classmethod
    def from_encoder(cls, encoder: nn.Module, patch_size: Sequence[int], input_channels: int,
                     num_target_channels: int, **kwargs) -> VAEBranch:
        """Build the VAE branch for ``encoder`` and crops of ``patch_size`` (targets are not used)."""
        return cls(EncoderSpec.of(encoder), patch_size, input_channels, **kwargs)

    def reconstruct(self, x: torch.Tensor, skips: Sequence[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the reconstruction (shape of ``x``), mu and log-variance (B, latent_dim, float32)."""
        bottleneck = skips[-1]
        if tuple(bottleneck.shape[2:]) != self.bottleneck_shape:
            raise ValueError(f"bottleneck has spatial shape {tuple(bottleneck.shape[2:])} but this VAE branch "
                             f"was built for {self.bottleneck_shape}; build it with the patch_size used for x")
        mu, logvar = self.to_moments(self.reduce(bottleneck).flatten(1)).float().chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        h = self.from_latent(z).view(-1, self.reduced_channels, *self.reduced_shape)
        h = resize(self.expand(h), bottleneck.shape[2:])
        for up_conv, block, skip in zip(self.up_convs, self.blocks, reversed(skips[:-1]), strict=True):
            h = block(resize(up_conv(h), skip.shape[2:]))
        return self.out(resize(h, x.shape[2:])), mu, logvar

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor], target: torch.Tensor | None,
                encoder: nn.Module) -> torch.Tensor:
        """Return ``weight * (MSE + KL)`` as a float32 scalar; ``target`` and ``encoder`` are unused."""
        recon, mu, logvar = self.reconstruct(x, skips)
        return self.weight * (F.mse_loss(recon.float(), x.float()) + kl_standard_normal(mu, logvar))
