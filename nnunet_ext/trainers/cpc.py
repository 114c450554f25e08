"""CPCSeg: the planned network plus the contrastive predictive coding branch (paper Table S3, eq. 3)."""

from nnunet_ext.branches.cpc import CPCBranch
from nnunet_ext.trainers.multitask import MultiTaskTrainer
from nnunet_ext.trainers.names import TrainerSpec
from nnunet_ext.trainers.semisupervised import SemiSupervisedMixin


class CPCSegTrainer(MultiTaskTrainer):
    """Encoder-decoder regularized by InfoNCE over 32^3 sub-patches encoded by its own encoder.

    Train it on GroupNorm plans (``nnunet-ext plan -pl nnUNetPlannerGN`` / ``nnUNetPlannerCPUGN``):
    with nnU-Net's InstanceNorm the pooled sub-patch vectors barely differ and InfoNCE stays at chance.
    """

    trainer_spec = TrainerSpec(base="CPCSegTrainer")
    branch_class = CPCBranch
    branch_kwargs = {"weight": 0.1}


class ssCPCSegTrainer(SemiSupervisedMixin, CPCSegTrainer):
    """CPCSeg that also learns the CPC branch from unlabeled images (paper's ssCPCseg)."""

    trainer_spec = TrainerSpec(base="ssCPCSegTrainer")
