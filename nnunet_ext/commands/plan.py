"""Plan a dataset with an nnunet_ext planner through nnU-Net's planning API.

Extracts the dataset fingerprint first when it is missing, then writes a normal plans file into
``$nnUNet_preprocessed/DatasetXXX_NAME/`` that nnUNetv2_preprocess / train / predict use via ``-p``.
nnU-Net's own planners (e.g. nnUNetPlannerResEncM) are accepted too. Works with ``nnUNet_n_proc_DA=0``
(nnU-Net's planner alone would crash; it plans with 1 and says so).
"""

from __future__ import annotations

import argparse
import importlib
import os

from nnunet_ext.planners import PLANNERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments mirror nnUNetv2_plan_experiment where they overlap."""
    parser.add_argument("-d", type=int, nargs="+", required=True, help="dataset id(s)")
    parser.add_argument("-pl", default="nnUNetPlannerCPU",
                        help=f"planner class: one of ours {sorted(PLANNERS)} or any nnU-Net planner name")
    parser.add_argument("-gpu_memory_target", type=float, default=None, help="GPU memory target in GB")
    parser.add_argument("-overwrite_plans_name", default=None, help="custom plans identifier")
    parser.add_argument("-np", type=int, default=None, help="processes for fingerprint extraction")
    parser.add_argument("--verify_dataset_integrity", action="store_true",
                        help="run nnU-Net's dataset integrity check during fingerprint extraction")
    parser.add_argument("--preprocess", action="store_true",
                        help="also run nnU-Net's preprocessing for the configurations given with -c")
    parser.add_argument("-c", nargs="+", default=["3d_fullres"], help="configurations to preprocess")


def planner_class(name: str) -> type:
    """Find a planner class by name: ours first, then nnU-Net's own experiment_planning package."""
    if name in PLANNERS:
        return getattr(importlib.import_module(PLANNERS[name]), name)
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"), name,
                                      current_module="nnunetv2.experiment_planning")
    if cls is None:
        raise SystemExit(f"nnunet-ext plan: unknown planner '{name}'. Ours: {sorted(PLANNERS)}; "
                         f"or an nnU-Net planner such as ExperimentPlanner or nnUNetPlannerResEncM.")
    return cls


def plan_dataset(dataset_id: int, planner: str = "nnUNetPlannerCPU", gpu_memory_target: float | None = None,
                 plans_name: str | None = None, num_processes: int | None = None,
                 verify_integrity: bool = False) -> str:
    """Fingerprint (if missing) and plan one dataset; return the plans identifier."""
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiment_dataset
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_ext.compat import planning_n_proc_DA

    cls = planner_class(planner)
    name = maybe_convert_to_dataset_name(dataset_id)
    fingerprint = os.path.join(nnUNet_preprocessed, name, "dataset_fingerprint.json")
    if not os.path.isfile(fingerprint):
        print(f"[nnunet-ext plan] extracting the fingerprint of {name}")
        extract_fingerprints([dataset_id], num_processes=num_processes or default_num_processes,
                             check_dataset_integrity=verify_integrity, clean=True)
    print(f"[nnunet-ext plan] planning {name} with {cls.__name__}")
    with planning_n_proc_DA():
        _, identifier = plan_experiment_dataset(dataset_id, cls, gpu_memory_target,
                                                overwrite_plans_name=plans_name)
    return identifier


def run(args: argparse.Namespace) -> int:
    """Plan each dataset, print the command that preprocesses it (or run it with --preprocess) and the training
    command of each configuration given with -c."""
    from nnunetv2.configuration import default_num_processes

    for d in args.d:
        identifier = plan_dataset(d, args.pl, args.gpu_memory_target, args.overwrite_plans_name, args.np,
                                  args.verify_dataset_integrity)
        if args.preprocess:
            from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess
            preprocess([d], identifier, args.c, [args.np or default_num_processes] * len(args.c))
        else:
            print(f"[nnunet-ext plan] next: nnUNetv2_preprocess -d {d} -plans_name {identifier} "
                  f"-c {' '.join(args.c)}")
        for configuration in args.c:
            print(f"[nnunet-ext plan] train with: nnUNetv2_train {d} {configuration} 0 -p {identifier} "
                  f"-tr EncDecTrainer")
    return 0
