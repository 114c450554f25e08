"""Experiment planners of nnunet_ext, run through ``nnunet-ext plan -pl NAME`` (see :data:`PLANNERS`)."""

PLANNERS = {
    "nnUNetPlannerCPU": "nnunet_ext.planners.cpu",
}
