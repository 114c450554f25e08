"""Re-export module that nnU-Net imports while searching ``nnUNet_extTrainer`` folders.

nnU-Net imports every module of this folder as a top-level module and asks ``hasattr(module, name)``;
our ``__getattr__`` (PEP 562) builds any valid trainer name on demand. Keep this file tiny.
"""

from nnunet_ext.trainers.names import __getattr__  # noqa: F401
