"""Regularization branches of Iwasawa et al. 2020 (VAE, boundary attention, CPC); pure torch."""

from nnunet_ext.branches.base import Branch
from nnunet_ext.branches.blocks import EncoderSpec, GroupNorm, ResBlock
from nnunet_ext.branches.boundary import (
    BoundaryBranch,
    boundary_beta,
    boundary_targets,
    soft_dice_loss,
    weighted_bce,
)
from nnunet_ext.branches.cpc import CPCBranch, cpc_grid, cpc_layout, extract_subpatches, info_nce, prediction_axis
from nnunet_ext.branches.vae import VAEBranch, kl_standard_normal

__all__ = [
    "Branch",
    "BoundaryBranch",
    "CPCBranch",
    "EncoderSpec",
    "GroupNorm",
    "ResBlock",
    "VAEBranch",
    "boundary_beta",
    "boundary_targets",
    "cpc_grid",
    "cpc_layout",
    "extract_subpatches",
    "info_nce",
    "kl_standard_normal",
    "prediction_axis",
    "soft_dice_loss",
    "weighted_bce",
]
