"""CPCSeg: the planned network plus the contrastive predictive coding branch (paper Table S3, eq. 3)."""

from nnunet_ext.branches.cpc import CPCBranch, default_chunk_size
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
    # Measured (benchmarks/cpc_weight.py, demo data, GroupNorm CPU plans, at initialisation): with the
    # overlapping layout the unweighted InfoNCE pulled on the encoder with 19.4x the gradient norm of nnU-Net's
    # segmentation loss, so 0.05 made the two pulls equal. With the paper's layout (no shared voxel) it is
    # 27.9x (median of 32 batches; docs/fidelity.md), i.e. 0.036 for equal pulls. 0.05 stays:
    # 1.4x apart is below what an at-initialisation heuristic resolves, and the CPU evidence study
    # (docs/study.md) was fixed with 0.05 before its results were seen. Much smaller weights also slow the
    # context network itself (one SGD for all parameters): at 0.01 InfoNCE fell only from 2.09 to 1.85
    # (chance ln 8 = 2.08) in 40 iterations on the demo data.
    branch_kwargs = {"weight": 0.05}

    def branch_arguments(self) -> dict:
        """On CUDA, encode sub-patches in checkpointed chunks sized to the memory nnU-Net planned."""
        kwargs = super().branch_arguments()
        kwargs.setdefault("chunk_size",
                          default_chunk_size(self.device, self.configuration_manager.patch_size, self.batch_size))
        return kwargs


class ssCPCSegTrainer(SemiSupervisedMixin, CPCSegTrainer):
    """CPCSeg that also learns the CPC branch from unlabeled images (paper's ssCPCseg)."""

    trainer_spec = TrainerSpec(base="ssCPCSegTrainer")
