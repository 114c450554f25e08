"""GroupNorm plans: nnU-Net's planning with ``norm_op`` = our GroupNorm (needed by the CPC branch).

nnU-Net's InstanceNorm fixes the spatial mean of every feature map, so mean-pooled CPC sub-patch
vectors barely differ (SPEC §3); the paper's encoder used GroupNorm(8). nnU-Net resolves ``norm_op``
by dotted path, so these plans work in stock nnU-Net wherever nnunet_ext is installed. Compare all
trainers of a study on the same plans.
"""

from __future__ import annotations

from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    nnUNetPlannerResEncM,
)

from nnunet_ext.planners.cpu import nnUNetPlannerCPU, nnUNetPlannerCPU96

GROUP_NORM = "nnunet_ext.nn.GroupNorm"  # public API: plans files store this path


class GroupNormPlansMixin:
    """Replace the planned ``norm_op`` by :data:`GROUP_NORM` in every configuration."""

    default_plans_name: str

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str | None = None,
                 overwrite_target_spacing=None, suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name,
                         plans_name or self.default_plans_name, overwrite_target_spacing, suppress_transpose)

    def get_plans_for_configuration(self, *args, **kwargs) -> dict:
        """The parent planner's plan with GroupNorm as normalization."""
        plan = super().get_plans_for_configuration(*args, **kwargs)
        plan["architecture"]["arch_kwargs"]["norm_op"] = GROUP_NORM
        return plan


class nnUNetPlannerGN(GroupNormPlansMixin, ExperimentPlanner):
    """nnU-Net's default planner with GroupNorm -> ``nnUNetGNPlans``."""

    default_plans_name = "nnUNetGNPlans"


class nnUNetPlannerResEncMGN(GroupNormPlansMixin, nnUNetPlannerResEncM):
    """nnU-Net's ResEnc M planner with GroupNorm -> ``nnUNetResEncUNetMGNPlans``."""

    default_plans_name = "nnUNetResEncUNetMGNPlans"


class nnUNetPlannerCPUGN(GroupNormPlansMixin, nnUNetPlannerCPU):
    """The small CPU planner with GroupNorm -> ``nnUNetCPUGNPlans`` (the demo's plans)."""

    default_plans_name = "nnUNetCPUGNPlans"


class nnUNetPlannerCPU96GN(GroupNormPlansMixin, nnUNetPlannerCPU96):
    """The CPU planner with patch edges up to 96 and GroupNorm -> ``nnUNetCPU96GNPlans`` (the cpu-evidence-96
    preset's plans)."""

    default_plans_name = "nnUNetCPU96GNPlans"


def norm_op_of(plans: dict, configuration: str) -> str | None:
    """The dotted ``norm_op`` path the plans give ``configuration`` (inherited configurations resolved), or None."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    arch = PlansManager(plans).get_configuration(configuration).network_arch_init_kwargs
    return arch.get("norm_op")


def _is_batch_or_instance_norm(path: str) -> bool:
    """Whether the dotted path names a batch or instance normalization (which CPC cannot train with)."""
    import pydoc

    from torch import nn

    cls = pydoc.locate(path)
    if not isinstance(cls, type):
        raise ValueError(f"norm_op '{path}' in the plans is not an importable class")
    if issubclass(cls, nn.GroupNorm):
        return False
    if issubclass(cls, (nn.modules.instancenorm._InstanceNorm, nn.modules.batchnorm._BatchNorm)):
        return True
    raise ValueError(f"norm_op '{path}' is neither a GroupNorm nor an instance or batch normalization; CPC "
                     f"trainers train GroupNorm ('{GROUP_NORM}') in place of instance and batch norms only")


def group_norm_plans(plans: dict) -> tuple[dict, dict[str, str]]:
    """A copy of ``plans`` in which every configuration's instance or batch ``norm_op`` is :data:`GROUP_NORM`, and
    ``{configuration: replaced norm_op}``.

    Instance normalisation fixes the spatial mean of each sub-patch's features, batch normalisation mixes the
    statistics of context and target sub-patches: CPC trainers train on the GroupNorm copy of whatever plans they
    are given (GroupNorm plans and plans without a norm stay as they are; any other norm is refused by name).
    """
    import copy

    plans = copy.deepcopy(plans)
    replaced = {}
    for name, configuration in plans.get("configurations", {}).items():
        arch_kwargs = configuration.get("architecture", {}).get("arch_kwargs", {})
        norm = arch_kwargs.get("norm_op")
        if norm is not None and _is_batch_or_instance_norm(norm):
            replaced[name] = norm
            arch_kwargs["norm_op"] = GROUP_NORM
    return plans, replaced
