"""The synthetic datasets the demo and the study's presets train on, and their preparation with the real commands.

Each :class:`SyntheticSetup` names a dataset id, the configuration it is preprocessed for and the arguments of
``make_demo_dataset``; :func:`prepare_synthetic_dataset` writes, plans and preprocesses it, skipping what is
already there. The demo and ``nnunet-ext study --preset`` both use them, so neither depends on the other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from nnunet_ext.datasets.synthetic import (
    DEFAULT_DATASET_ID,
    DEFAULT_NAME,
    DEFAULT_SHAPE,
    VARIETY_NAME,
    make_demo_dataset,
)
from nnunet_ext.pipeline import log, run_command

PLANNER, PLANS = "nnUNetPlannerCPUGN", "nnUNetCPUGNPlans"  # one set of plans for every trainer compared
ROOT = "nnunet_ext_demo"  # where the demo and the presets keep nnU-Net's folders when nnUNet_* are unset


@dataclass(frozen=True)
class SyntheticSetup:
    """A synthetic dataset as trained on: its id, the configuration it is preprocessed for, the keyword
    arguments of ``make_demo_dataset`` that write it, and the planner and plans it is planned with."""

    dataset_id: int
    configuration: str
    data: dict
    planner: str = PLANNER
    plans: str = PLANS


# the demo's data (and the cpu-smoke preset's): 20 training, 4 test and 16 unlabeled cases of 52 x 52 x 72 voxels
DEMO = SyntheticSetup(DEFAULT_DATASET_ID, "3d_fullres",
                      {"num_train": 20, "num_test": 4, "num_unlabeled": 16, "shape": DEFAULT_SHAPE, "seed": 0})
# the cpu-evidence preset's data (docs/study.md): more brain, tumour and scanner variety than 3-6 labeled cases show
EVIDENCE = SyntheticSetup(989, "2d", {"num_train": 40, "num_test": 20, "num_unlabeled": 60, "shape": (40, 72, 96),
                                      "seed": 1, "variety": True})
# the same recipe drawn with another seed: where a rule decided on EVIDENCE is confirmed without retuning (#19)
EVIDENCE_CONFIRM = SyntheticSetup(988, "2d", dict(EVIDENCE.data, seed=2))
# larger slices (median 82 x 108 after cropping) planned with 96-voxel patch edges: five CPC positions on the
# prediction axis instead of three (the cpu-evidence-96 preset, docs/study.md)
EVIDENCE_96 = SyntheticSetup(987, "2d", dict(EVIDENCE.data, shape=(40, 96, 128), seed=3),
                             planner="nnUNetPlannerCPU96GN", plans="nnUNetCPU96GNPlans")
# the 96 recipe drawn with another seed: the cpu-evidence-96 grid repeated without retuning anything (#19)
EVIDENCE_96_CONFIRM = SyntheticSetup(986, "2d", dict(EVIDENCE_96.data, seed=4),
                                     planner=EVIDENCE_96.planner, plans=EVIDENCE_96.plans)


def prepare_synthetic_dataset(env: dict[str, str], dataset_id: int, configuration: str, log_folder: str,
                              unlabeled: bool, planner: str = PLANNER, plans: str = PLANS, **make_kwargs) -> str:
    """The synthetic dataset ``dataset_id`` (``make_demo_dataset(**make_kwargs)`` unless it exists), planned with
    ``planner`` (default :data:`PLANNER`, plans ``plans``) and preprocessed for ``configuration``; with
    ``unlabeled`` also its imagesUnlabeled.

    nnU-Net's planner fails with ``nnUNet_n_proc_DA=0``, which users set to debug training; planning and
    preprocessing run with 2 processes whatever it says. Returns the raw dataset folder.
    """
    name = VARIETY_NAME if make_kwargs.get("variety") else DEFAULT_NAME
    raw = os.path.join(env["nnUNet_raw"], f"Dataset{dataset_id:03d}_{name}")
    if os.path.isfile(os.path.join(raw, "dataset.json")):
        log(f"using existing dataset {raw}", "prepare")
    else:
        log(f"writing the synthetic dataset {raw}", "prepare")
        make_demo_dataset(dataset_id, env["nnUNet_raw"], **make_kwargs)
    env = dict(env, nnUNet_n_proc_DA="2")
    preprocessed = os.path.join(env["nnUNet_preprocessed"], os.path.basename(raw))
    if os.path.isdir(os.path.join(preprocessed, f"{plans}_{configuration}")):
        log(f"using existing preprocessed data in {preprocessed}", "prepare")
    else:
        if not os.path.isfile(os.path.join(preprocessed, f"{plans}.json")):
            run_command(["nnunet-ext", "plan", "-d", str(dataset_id), "-pl", planner, "-np", "2"], env,
                        os.path.join(log_folder, "plan.log"))
        run_command(["nnUNetv2_preprocess", "-d", str(dataset_id), "-plans_name", plans, "-c", configuration,
                     "-np", "2"], env, os.path.join(log_folder, "preprocess.log"))
    if unlabeled:  # skips cases already done
        run_command(["nnunet-ext", "preprocess-unlabeled", "-d", str(dataset_id), "-p", plans, "-c", configuration,
                     "-np", "2"], env, os.path.join(log_folder, "preprocess_unlabeled.log"))
    return raw
