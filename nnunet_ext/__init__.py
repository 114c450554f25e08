"""Label-efficient multi-task and semi-supervised trainers for nnU-Net v2 (Iwasawa et al. 2020)."""

__version__ = "0.1.0"
