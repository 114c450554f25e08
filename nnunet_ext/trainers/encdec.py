"""EncDec: the paper's baseline, i.e. nnU-Net's planned U-Net with no regularization branch."""

from nnunet_ext.trainers.base import ExtTrainer
from nnunet_ext.trainers.names import TrainerSpec


class EncDecTrainer(ExtTrainer):
    """Plain encoder-decoder (the planned network, nnU-Net's loss); supports the name grammar."""

    trainer_spec = TrainerSpec(base="EncDecTrainer")
