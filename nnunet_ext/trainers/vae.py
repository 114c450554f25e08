"""VAESeg: the planned network plus the VAE branch (paper Table S1), loss 0.1 * (L2 + KL)."""

from nnunet_ext.branches.vae import VAEBranch
from nnunet_ext.trainers.multitask import MultiTaskTrainer
from nnunet_ext.trainers.names import TrainerSpec
from nnunet_ext.trainers.semisupervised import SemiSupervisedMixin


class VAESegTrainer(MultiTaskTrainer):
    """Encoder-decoder regularized by reconstructing the (augmented) input through a VAE."""

    trainer_spec = TrainerSpec(base="VAESegTrainer")
    branch_class = VAEBranch


class ssVAESegTrainer(SemiSupervisedMixin, VAESegTrainer):
    """VAESeg that also learns the VAE branch from unlabeled images (paper's ssVAEseg)."""

    trainer_spec = TrainerSpec(base="ssVAESegTrainer")
