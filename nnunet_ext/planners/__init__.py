"""Experiment planners of nnunet_ext, run through ``nnunet-ext plan -pl NAME`` (see :data:`PLANNERS`)."""

PLANNERS = {
    "nnUNetPlannerCPU": "nnunet_ext.planners.cpu",
    "nnUNetPlannerCPUGN": "nnunet_ext.planners.groupnorm",
    "nnUNetPlannerCPU96": "nnunet_ext.planners.cpu",
    "nnUNetPlannerCPU96GN": "nnunet_ext.planners.groupnorm",
    "nnUNetPlannerGN": "nnunet_ext.planners.groupnorm",
    "nnUNetPlannerResEncMGN": "nnunet_ext.planners.groupnorm",
}
