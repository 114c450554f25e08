"""Plan a dataset with an nnunet_ext planner through nnU-Net's planning API.

Extracts the dataset fingerprint first when it is missing, then writes a normal plans file into
``$nnUNet_preprocessed/DatasetXXX_NAME/`` that nnUNetv2_preprocess / train / predict use via ``-p``.
nnU-Net's own planners (e.g. nnUNetPlannerResEncM) are accepted too. Works with ``nnUNet_n_proc_DA=0``
(nnU-Net's planner alone would crash; it plans with 1 and says so).

``--like-pretrained CKPT_OR_ADAPTATION_PLAN`` then derives plans whose 3d_fullres network, spacing, normalization and
patch size are those of an nnssl checkpoint (e.g. OpenMind's ResEncL), so that ``-pretrained_weights CKPT`` loads
every encoder weight (:mod:`nnunet_ext.planners.like_pretrained`); given the checkpoint, it checks that they do.
Existing like-pretrained plans with other content (another checkpoint, patch size or norm) are kept and the command
refuses, naming the checkpoint they were planned for, unless ``--overwrite-like-pretrained`` is given.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os

from nnunet_ext.files import json_differences, write_json_atomic
from nnunet_ext.planners import PLANNERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments mirror nnUNetv2_plan_experiment where they overlap."""
    parser.add_argument("-d", type=int, nargs="+", required=True, help="dataset id(s)")
    parser.add_argument("-pl", default="nnUNetPlannerCPU",
                        help=f"planner class: one of ours {sorted(PLANNERS)} or any nnU-Net planner name")
    parser.add_argument("-gpu_memory_target", type=float, default=None, help="GPU memory target in GB")
    parser.add_argument("-overwrite_plans_name", default=None,
                        help="custom plans identifier (with --like-pretrained: of the like-pretrained plans)")
    parser.add_argument("-np", type=int, default=None, help="processes for fingerprint extraction")
    parser.add_argument("--verify_dataset_integrity", action="store_true",
                        help="run nnU-Net's dataset integrity check during fingerprint extraction")
    parser.add_argument("--preprocess", action="store_true",
                        help="also run nnU-Net's preprocessing for the configurations given with -c")
    parser.add_argument("-c", nargs="+", default=["3d_fullres"], help="configurations to preprocess")
    parser.add_argument("--like-pretrained", metavar="CKPT_OR_ADAPTATION_PLAN", default=None,
                        help="also write plans whose 3d_fullres network, spacing, normalization and patch size are "
                             "those of an nnssl checkpoint (checkpoint_final.pth or its adaptation_plan.json), named "
                             "nnUNetLikePretrainedPlans or -overwrite_plans_name")
    parser.add_argument("--group-norm", action="store_true",
                        help="with --like-pretrained: GroupNorm instead of the checkpoint's norm (to compare CPC "
                             "trainers, which train GroupNorm, with the others on the same plans)")
    parser.add_argument("--patch-size", type=int, nargs="+", default=None,
                        help="with --like-pretrained: this patch size instead of the adaptation plan's recommended one")
    parser.add_argument("--overwrite-like-pretrained", action="store_true",
                        help="with --like-pretrained: replace existing like-pretrained plans of the same name that "
                             "differ (else refused: their preprocessed data and trainings belong to them)")


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


def plan_like_pretrained(dataset_id: int | str, base_identifier: str, source: str, plans_name: str | None = None,
                         group_norm: bool = False, patch_size: list[int] | None = None,
                         overwrite: bool = False) -> str:
    """Write plans like the nnssl checkpoint or adaptation plan ``source`` from the dataset's ``base_identifier``
    plans (:mod:`nnunet_ext.planners.like_pretrained`); given a checkpoint, check that every encoder weight fits.
    Plans of that name with other content are refused (FileExistsError naming the checkpoint they were planned for)
    unless ``overwrite``. Return the plans identifier."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_ext.nnssl import read_adaptation_plan
    from nnunet_ext.planners import like_pretrained
    from nnunet_ext.pretrained import check_fits

    source = os.path.abspath(source)
    adaptation = read_adaptation_plan(source)
    folder = os.path.join(nnUNet_preprocessed, maybe_convert_to_dataset_name(dataset_id))
    with open(os.path.join(folder, f"{base_identifier}.json")) as f:
        base = json.load(f)
    name = plans_name or (like_pretrained.GROUP_NORM_PLANS_NAME if group_norm else like_pretrained.PLANS_NAME)
    plans = json.loads(json.dumps(like_pretrained.like_pretrained_plans(base, adaptation, name, group_norm,
                                                                        patch_size)))  # as it would be read back
    path = os.path.join(folder, f"{name}.json")
    existing = _existing_plans(path)
    if existing is not None and existing != plans and not overwrite:
        like = existing.get("nnunet_ext_like_pretrained") if isinstance(existing, dict) else None
        planned_for = like.get("adaptation_plan") if isinstance(like, dict) else None
        what = f"planned like {planned_for}" if planned_for else "not like-pretrained plans of nnunet-ext"
        raise FileExistsError(
            f"--like-pretrained: {path} exists ({what}) and differs from the plans like {source} (differing: "
            f"{', '.join(json_differences(existing, plans))}); its preprocessed data and trainings belong to it. "
            f"Give -overwrite_plans_name OTHER_NAME to write these plans beside it, or --overwrite-like-pretrained to "
            f"replace it (then preprocess again; folds trained under {name} are not retrained by themselves)")
    if not source.endswith(".json"):
        channels = len(plans["configurations"][like_pretrained.CONFIGURATION]["normalization_schemes"])
        transfer = check_fits(source, plans, like_pretrained.CONFIGURATION, channels)
        adapted = f"; adapted: {', '.join(transfer.adapted.values())}" if transfer.adapted else ""
        fit = f"all {len(transfer.values)} encoder and stem tensors of {source} fit{adapted}"
    else:
        fit = "the checkpoint's fit is checked when training loads it"
    if existing is not None and existing != plans:
        print(f"[nnunet-ext plan] --overwrite-like-pretrained: replacing {path}")
    write_json_atomic(path, plans, indent=4)
    print(f"[nnunet-ext plan] like the pretrained {adaptation.short_name}: {like_pretrained.describe(plans)}; "
          f"{fit} ({path})")
    return name


def _existing_plans(path: str) -> dict | None:
    """The plans at ``path``, None when there are none; ValueError when the file is not JSON."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"--like-pretrained: {path} exists but is not valid JSON ({error}); move it aside") from None


def run(args: argparse.Namespace) -> int:
    """Plan each dataset (like a pretrained checkpoint with --like-pretrained), print the command that preprocesses it
    (or run it with --preprocess) and the training command of each configuration given with -c."""
    from nnunetv2.configuration import default_num_processes

    if not args.like_pretrained and (args.group_norm or args.patch_size or args.overwrite_like_pretrained):
        raise ValueError("--group-norm, --patch-size and --overwrite-like-pretrained go with --like-pretrained")
    if args.like_pretrained and args.c != ["3d_fullres"]:
        raise ValueError(f"-c {' '.join(args.c)}: --like-pretrained plans the 3d_fullres configuration only (the "
                         f"checkpoint is a 3-D network)")
    for d in args.d:
        identifier = plan_dataset(d, args.pl, args.gpu_memory_target,
                                  None if args.like_pretrained else args.overwrite_plans_name, args.np,
                                  args.verify_dataset_integrity)
        pretrained = ""
        if args.like_pretrained:
            identifier = plan_like_pretrained(d, identifier, args.like_pretrained, args.overwrite_plans_name,
                                              args.group_norm, args.patch_size, args.overwrite_like_pretrained)
            checkpoint = "CHECKPOINT" if args.like_pretrained.endswith(".json") else \
                os.path.abspath(args.like_pretrained)
            pretrained = f" -pretrained_weights {checkpoint}"
        if args.preprocess:
            from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess
            preprocess([d], identifier, args.c, [args.np or default_num_processes] * len(args.c))
        else:
            print(f"[nnunet-ext plan] next: nnUNetv2_preprocess -d {d} -plans_name {identifier} "
                  f"-c {' '.join(args.c)}")
        for configuration in args.c:
            print(f"[nnunet-ext plan] train with: nnUNetv2_train {d} {configuration} 0 -p {identifier} "
                  f"-tr EncDecTrainer{pretrained}")
    return 0
