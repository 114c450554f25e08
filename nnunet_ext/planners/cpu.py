"""A planner for CPU work: nnU-Net's planning with small networks, small patches and batch 2."""

from __future__ import annotations

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner


class nnUNetPlannerCPU(ExperimentPlanner):
    """Default nnU-Net topology rules with features 8..64, patch edges <= 64 voxels and batch size 2.

    About 0.1 s per training iteration on 2 CPU cores for a 48^3 patch, versus ~4 s for default plans.
    The patch keeps nnU-Net's spacing-derived aspect ratio; only its upper bound changes.
    """

    max_patch_edge = 64
    max_batch_size = 2
    default_plans_name = "nnUNetCPUPlans"

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str | None = None,
                 overwrite_target_spacing=None, suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name,
                         plans_name or self.default_plans_name, overwrite_target_spacing, suppress_transpose)
        self.UNet_base_num_features = 8
        self.UNet_max_features_3d = 64
        self.UNet_max_features_2d = 64

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        """nnU-Net's plan with the initial patch clipped to ``max_patch_edge`` per axis and batch <= 2."""
        capped_shape = np.minimum(np.asarray(median_shape), self.max_patch_edge)
        plan = super().get_plans_for_configuration(spacing, capped_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        plan["median_image_size_in_voxels"] = median_shape
        plan["batch_size"] = min(plan["batch_size"], self.max_batch_size)
        return plan


class nnUNetPlannerCPU96(nnUNetPlannerCPU):
    """:class:`nnUNetPlannerCPU` with patch edges up to 96 voxels -> ``nnUNetCPU96Plans``: room for five CPC sub-patch
    positions (32-voxel sub-patches, stride 16) along an axis of 96, where a 64-voxel patch holds three."""

    max_patch_edge = 96
    default_plans_name = "nnUNetCPU96Plans"
