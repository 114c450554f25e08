"""BoundSeg: the planned network plus the boundary-attention branch (paper Table S2, eq. 2)."""

from nnunet_ext.branches.boundary import BoundaryBranch
from nnunet_ext.trainers.multitask import MultiTaskTrainer
from nnunet_ext.trainers.names import TrainerSpec


class BoundSegTrainer(MultiTaskTrainer):
    """Encoder-decoder regularized by predicting region boundaries made on the fly from the targets."""

    trainer_spec = TrainerSpec(base="BoundSegTrainer")
    branch_class = BoundaryBranch
