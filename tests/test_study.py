"""The study runner: grid, validation, --dispatch print/submitit, resumability (stubbed nnU-Net), and one
slow run of a tiny real grid through the ``nnunet-ext study`` command."""

from __future__ import annotations

import ast
import csv
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import SimpleITK as sitk
from test_locks import write_lock

import nnunet_ext
from nnunet_ext import cli, locks, pipeline
from nnunet_ext.datasets import prepare
from nnunet_ext.datasets.synthetic import DEFAULT_DATASET_ID, REGION_LABELS
from nnunet_ext.planners.groupnorm import GROUP_NORM, group_norm_plans
from nnunet_ext.study import build_grid, prepare_preset_dataset, resolve_options, time_left
from nnunet_ext.trainers.names import BASES

DATASET = "Dataset042_Fake"
RESULT_FOLDER = "{trainer}__nnUNetPlans__3d_fullres"
INSTANCE_NORM = "torch.nn.modules.instancenorm.InstanceNorm3d"


def write_plans(preprocessed, name: str, norm: str = INSTANCE_NORM, planner: str = "ExperimentPlanner") -> None:
    """A plans file with one 3d_fullres network whose norm is ``norm``, as ``planner`` names itself in it."""
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"norm_op": norm}, "_kw_requires_import": ["norm_op"]}
    plans = {"plans_name": name, "experiment_planner_used": planner,
             "configurations": {"3d_fullres": {"architecture": arch}}}
    (preprocessed / f"{name}.json").write_text(json.dumps(plans))


@pytest.fixture
def ss_base(monkeypatch):
    """Register a fake semi-supervised base so that grids with ss trainers can be built."""
    monkeypatch.setitem(BASES, "ssFakeTrainer", ("nnunet_ext.trainers.encdec", True))
    return "ssFake"


@pytest.fixture
def fake_nnunet(tmp_path, monkeypatch):
    """nnU-Net folders with a 2-case labeled test split, InstanceNorm plans ``nnUNetPlans``, and a stub of
    ``run_command``.

    The stub records every command; training writes the fold's validation summary (what
    ``Experiment.is_trained`` looks for) and the plans.json nnU-Net writes into the result folder (for CPC
    trainers their GroupNorm copy) unless the trainer/fold is in ``fail``; prediction copies the reference label
    maps into the output folder, so the real evaluation gives Dice 1.
    """
    raw = tmp_path / "raw" / DATASET
    for sub in ("imagesTs", "labelsTs"):
        (raw / sub).mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "FLAIR"}, "labels": REGION_LABELS, "regions_class_order": [1, 2, 3],
        "numTraining": 10, "file_ending": ".nii.gz"}))
    for case in range(2):
        label = np.zeros((6, 6, 6), np.uint8)
        label[1:4, 1:4, 1:4] = 1
        label[2, 2, 2 + case] = 3
        sitk.WriteImage(sitk.GetImageFromArray(label), str(raw / "labelsTs" / f"FAKE_{case}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(label.astype(np.float32)),
                        str(raw / "imagesTs" / f"FAKE_{case}_0000.nii.gz"))
    (tmp_path / "preprocessed" / DATASET).mkdir(parents=True)
    write_plans(tmp_path / "preprocessed" / DATASET, "nnUNetPlans")
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    fake = types.SimpleNamespace(calls=[], fail=set(), raw=raw, results=tmp_path / "results" / DATASET,
                                 output=tmp_path / "results" / DATASET / "study",
                                 preprocessed=tmp_path / "preprocessed" / DATASET)

    def run_command(cmd: list[str], env: dict[str, str], log_path: str, echo: bool = True) -> None:
        fake.calls.append(cmd)
        trainer = cmd[cmd.index("-tr") + 1]
        if cmd[0] == "nnUNetv2_train":
            if (trainer, int(cmd[3])) in fake.fail:
                raise RuntimeError(f"command failed (exit 1): {' '.join(cmd)}; see {log_path}")
            plans_name = cmd[cmd.index("-p") + 1]
            fold = fake.results / f"{trainer}__{plans_name}__{cmd[2]}" / f"fold_{cmd[3]}" / "validation"
            fold.mkdir(parents=True)
            (fold / "summary.json").write_text("{}")
            plans = json.loads((fake.preprocessed / f"{plans_name}.json").read_text())
            if trainer.startswith(("CPCSeg", "ssCPCSeg")):  # what the CPC trainers train (trainers/cpc.py)
                plans = group_norm_plans(plans)[0]
            (fold.parent.parent / "plans.json").write_text(json.dumps(plans))
            if trainer.startswith("ss"):  # what ss* trainers record: 10 unlabeled images in fold 0, 11 in fold 1
                ids = [f"U{i}" for i in range(10 + int(cmd[3]))]
                (fold.parent / "unlabeled_cases.json").write_text(json.dumps({"unlabeled": ids}))
        else:
            shutil.copytree(raw / "labelsTs", cmd[cmd.index("-o") + 1], dirs_exist_ok=True)

    monkeypatch.setattr(pipeline, "run_command", run_command)
    return fake


def study(*argv: str) -> int:
    """Run ``nnunet-ext study`` in this process through the real command line parser."""
    return cli.main(["study", "-d", "42", *argv])


def trainings(calls: list[list[str]]) -> list[tuple[str, str]]:
    """(trainer, fold) of the recorded training commands."""
    return [(c[c.index("-tr") + 1], c[3]) for c in calls if c[0] == "nnUNetv2_train"]


def test_grid_names_supervised_and_semi_supervised(ss_base):
    cells = build_grid(["EncDec", ss_base], [3, 6], [10, 100], epochs=5, mirroring=False)
    assert [c.trainer.removesuffix("_5epochs_noMirroring") for c in cells] == [
        "EncDecTrainer_3labels", "EncDecTrainer_6labels", "ssFakeTrainer_3labels_10unlabeled",
        "ssFakeTrainer_3labels_100unlabeled", "ssFakeTrainer_6labels_10unlabeled", "ssFakeTrainer_6labels_100unlabeled"]
    assert all(c.trainer.endswith("_5epochs_noMirroring") for c in cells)
    assert [(c.model, c.labels, c.unlabeled) for c in cells[:3]] == [("EncDec", 3, None), ("EncDec", 6, None),
                                                                  ("ssFake", 3, 10)]


def test_grid_without_unlabeled_uses_all_and_dedupes(ss_base):
    cells = build_grid(["EncDecTrainer", "EncDec", ss_base], [6, 6], iters=4)
    assert [c.trainer for c in cells] == ["EncDecTrainer_6labels_4iters", "ssFakeTrainer_6labels_4iters"]
    assert cells[1].unlabeled is None


def test_repeats_train_every_cell_with_its_seed(ss_base):
    cells = build_grid(["EncDec", ss_base], [3], iters=4, repeats=2)
    assert [(c.trainer, c.repeat) for c in cells] == [
        ("EncDecTrainer_3labels_4iters_s0", 0), ("EncDecTrainer_3labels_4iters_s1", 1),
        ("ssFakeTrainer_3labels_4iters_s0", 0), ("ssFakeTrainer_3labels_4iters_s1", 1)]
    assert [c.trainer for c in build_grid(["EncDec"], [3], repeats=1)] == ["EncDecTrainer_3labels"]  # as before


def test_time_left_is_estimated_from_cells_that_worked():
    assert time_left([60.0, 120.0], 4) == "6 min" and time_left([3600.0], 2) == "2.0 h"
    assert time_left([], 3) == "unknown" and time_left([10.0], 0) == "0 s"


def test_unknown_bases_are_rejected():
    with pytest.raises(ValueError, match="--trainers: 'Foo' is not a trainer base; available: EncDec, VAESeg"):
        build_grid(["Foo"], [3])
    with pytest.raises(ValueError, match="'EncDec_6labels' is not a trainer base.*--labels"):
        build_grid(["EncDec_6labels"], [3])
    with pytest.raises(ValueError, match="invalid trainer.*positive integer"):
        build_grid(["EncDec"], [0])


def user_error(capsys, *argv: str) -> str:
    """Run ``nnunet-ext study`` expecting a user error: exit code 2 and one line on stderr; return that line."""
    assert study(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("nnunet-ext study: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_cli_errors_name_the_argument(fake_nnunet, monkeypatch, capsys):
    assert "'Foo' is not a trainer base" in user_error(capsys, "--trainers", "Foo", "--labels", "3")
    assert "--labels required" in user_error(capsys, "--trainers", "EncDec")
    with pytest.raises(SystemExit):
        study("--trainers", "EncDec", "--labels", "0")
    assert "argument --labels: must be a positive integer, got 0" in capsys.readouterr().err
    assert "--num-gpus 2 needs --device cuda" in user_error(capsys, "--trainers", "EncDec", "--labels", "3",
                                                            "--num-gpus", "2", "--device", "cpu")
    assert re.search("-p OtherPlans: .*OtherPlans.json does not exist",
                     user_error(capsys, "--trainers", "EncDec", "--labels", "3", "-p", "OtherPlans"))
    assert cli.main(["study", "-d", "43", "--trainers", "EncDec", "--labels", "3"]) == 2
    assert "-d 43: expected one Dataset043_" in capsys.readouterr().err
    with pytest.raises(ValueError, match="-d 43: expected one Dataset043_"):  # --debug: the traceback
        cli.main(["study", "-d", "43", "--trainers", "EncDec", "--labels", "3", "--debug"])
    monkeypatch.delenv("nnUNet_results")
    assert "set nnUNet_results" in user_error(capsys, "--trainers", "EncDec", "--labels", "3")
    assert fake_nnunet.calls == []


def test_budgets_beyond_a_fold_are_refused_before_anything_trains(fake_nnunet, capsys):
    # 10 training cases: nnU-Net's seeded 5-fold split trains on 8 in every fold
    assert ("--labels 9 999: fold 0 has only 8 training cases (folds 0 1: 8 8); choose budgets <= 8" in
            user_error(capsys, "--trainers", "EncDec", "--labels", "3", "9", "999", "--folds", "0", "1"))
    splits = [{"train": [f"C{i}" for i in range(8 - fold)], "val": ["V"]} for fold in range(5)]
    (fake_nnunet.preprocessed / "splits_final.json").write_text(json.dumps(splits))  # nnU-Net's own file decides
    assert ("--labels 6: fold 3 has only 5 training cases (folds 0 3 7: 8 5 7)" in
            user_error(capsys, "--trainers", "EncDec", "--labels", "6", "--folds", "0", "3", "7"))  # 7: 80:20 of 9
    (fake_nnunet.preprocessed / "splits_final.json").unlink()
    (fake_nnunet.raw / "dataset.json").write_text(json.dumps({**json.loads((fake_nnunet.raw / "dataset.json")
                                                                           .read_text()), "numTraining": 4}))
    assert "4 training cases (dataset.json numTraining), but nnU-Net's 5-fold cross-validation needs at least 5" in \
        user_error(capsys, "--trainers", "EncDec", "--labels", "1")
    assert fake_nnunet.calls == []


def test_a_failed_command_names_the_exception_that_ended_it(tmp_path):
    script = "print('Epoch 1'); raise ValueError('Label budget 999 exceeds the 8 training cases of this fold')"
    with pytest.raises(RuntimeError, match=r"^ValueError: Label budget 999 exceeds the 8 training cases of this fold "
                                           r"\(command failed \(exit 1\): .*; see .*train.log\)$"):
        pipeline.run_command([sys.executable, "-c", script], dict(os.environ), str(tmp_path / "train.log"))
    with pytest.raises(RuntimeError, match=r"^command failed \(exit 3\): "):  # nothing to name: the log says more
        pipeline.run_command([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), str(tmp_path / "b.log"))


def test_a_second_run_on_the_same_study_folder_or_training_fold_is_refused(fake_nnunet, capsys):
    grid = ("--trainers", "EncDec", "--labels", "3", "--folds", "0", "1")
    write_lock(fake_nnunet.output / locks.LOCK_FILE, os.getppid())  # a study that is running
    assert re.search(rf"study folder .*study is in use by pid {os.getppid()} on host ",
                     user_error(capsys, *grid))
    assert fake_nnunet.calls == []
    (fake_nnunet.output / locks.LOCK_FILE).unlink()
    fold = fake_nnunet.results / RESULT_FOLDER.format(trainer="EncDecTrainer_3labels") / "fold_1"
    write_lock(fold / locks.LOCK_FILE, os.getppid())  # another study training this fold into the same result folder
    assert study(*grid, "--output", str(fake_nnunet.results / "other_study")) == 1
    out = capsys.readouterr().out
    assert re.search(r"EncDecTrainer_3labels: FAILED: training fold 1 of EncDecTrainer_3labels \(.*fold_1\) is in use "
                     rf"by pid {os.getppid()}", out)
    assert trainings(fake_nnunet.calls) == [("EncDecTrainer_3labels", "0")]  # fold 1 not trained a second time
    assert not (fake_nnunet.output / locks.LOCK_FILE).exists()  # released by the run that held it


def test_missing_test_labels_are_an_error(fake_nnunet, capsys):
    shutil.rmtree(fake_nnunet.raw / "labelsTs")
    assert "no labelsTs/" in user_error(capsys, "--trainers", "EncDec", "--labels", "3")


def test_preset_fills_only_unset_options():
    args = cli.build_parser("study").parse_args(["study", "--preset", "cpu-smoke", "--labels", "4"])
    resolve_options(args)
    assert args.d == DEFAULT_DATASET_ID and args.plans == prepare.PLANS
    assert args.labels == [4] and args.folds == [0] and args.device == "cpu" and args.no_mirroring
    assert args.trainers == ["EncDec", "VAESeg", "BoundSeg", "CPCSeg", "ssVAESeg", "ssCPCSeg"]  # the paper's six
    plain = resolve_options(cli.build_parser("study").parse_args(["study", "-d", "1", "--trainers", "EncDec",
                                                                  "--labels", "3"]))
    assert (plain.plans, plain.configuration, plain.device, plain.folds) == ("nnUNetPlans", "3d_fullres", "cuda",
                                                                             [0, 1, 2, 3, 4])
    assert plain.no_mirroring is False


def test_evidence_preset_is_fixed_and_prepares_its_own_dataset(monkeypatch):
    args = resolve_options(cli.build_parser("study").parse_args(["study", "--preset", "cpu-evidence"]))
    assert (args.d, args.plans, args.configuration, args.repeats, args.folds, args.epochs * args.iters,
            args.no_mirroring) == (989, "nnUNetCPUGNPlans", "2d", 3, [0], 500, True)
    assert args.trainers == ["EncDec", "CPCSeg", "ssCPCSeg", "ssVAESeg"] and args.labels == [3, 6]
    prepared = []
    monkeypatch.setattr(prepare, "prepare_synthetic_dataset", lambda *a, **k: prepared.append((a, k)))
    prepare_preset_dataset(args, {})
    (env, dataset_id, configuration, _), kwargs = prepared[0]
    assert (dataset_id, configuration, kwargs["variety"], kwargs["unlabeled"]) == (989, "2d", True, True)
    with pytest.raises(ValueError, match="--preset cpu-evidence prepares -d 989 -p nnUNetCPUGNPlans -c 2d"):
        prepare_preset_dataset(resolve_options(cli.build_parser("study").parse_args(
            ["study", "--preset", "cpu-evidence", "-c", "3d_fullres"])), {})


@pytest.mark.parametrize("preset, dataset_id, plans, planner, seed, shape", [
    ("cpu-evidence-confirm", 988, "nnUNetCPUGNPlans", "nnUNetPlannerCPUGN", 2, (40, 72, 96)),
    ("cpu-evidence-96", 987, "nnUNetCPU96GNPlans", "nnUNetPlannerCPU96GN", 3, (40, 96, 128)),
    ("cpu-evidence-96-confirm", 986, "nnUNetCPU96GNPlans", "nnUNetPlannerCPU96GN", 4, (40, 96, 128)),
])
def test_cpc_stability_presets_prepare_their_own_data(monkeypatch, preset, dataset_id, plans, planner, seed, shape):
    """The confirmation preset draws cpu-evidence's recipe with another seed; the 96 preset plans 96-voxel patches."""
    args = resolve_options(cli.build_parser("study").parse_args(["study", "--preset", preset]))
    assert (args.d, args.plans, args.configuration, args.repeats, args.folds) == (dataset_id, plans, "2d", 5, [0])
    assert args.trainers[:3] == ["EncDec", "CPCSeg", "ssCPCSeg"]
    prepared = []
    monkeypatch.setattr(prepare, "prepare_synthetic_dataset", lambda *a, **k: prepared.append((a, k)))
    prepare_preset_dataset(args, {})
    (_, prepared_id, configuration, _), kwargs = prepared[0]
    assert (prepared_id, configuration, kwargs["planner"], kwargs["plans"]) == (dataset_id, "2d", planner, plans)
    assert kwargs == dict(prepare.EVIDENCE.data, seed=seed, shape=shape, unlabeled=True, planner=planner, plans=plans)


def test_preset_prepares_the_demo_dataset_with_the_demo_arguments(monkeypatch):
    from nnunet_ext import demo

    prepared = []
    for module in (prepare, demo):
        monkeypatch.setattr(module, "prepare_synthetic_dataset", lambda *a, **k: prepared.append((a, k)))
    args = resolve_options(cli.build_parser("study").parse_args(["study", "--preset", "cpu-smoke", "-d", "991"]))
    prepare_preset_dataset(args, {})
    defaults = cli.build_parser("demo").parse_args(["demo"])  # what `nnunet-ext demo` writes
    demo.prepare_dataset(defaults, {})
    (_, dataset_id, configuration, logs), kwargs = prepared[0]
    assert (dataset_id, configuration, logs) == (991, "3d_fullres", os.path.abspath("nnunet_ext_demo/logs"))
    assert kwargs["unlabeled"] and kwargs == dict(prepared[1][1], shape=tuple(prepared[1][1]["shape"]))
    with pytest.raises(ValueError, match="--preset cpu-smoke prepares -p nnUNetCPUGNPlans -c 3d_fullres; drop -p/-c"):
        prepare_preset_dataset(resolve_options(cli.build_parser("study").parse_args(
            ["study", "--preset", "cpu-smoke", "-p", "nnUNetPlans"])), {})


def imported_modules(path: str) -> set[str]:
    """Every module a source file imports, at module level or in a function (``from a import b``: a and a.b)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_imports_run_demo_then_study_then_datasets():
    root = os.path.dirname(nnunet_ext.__file__)
    assert "nnunet_ext.demo" not in imported_modules(os.path.join(root, "study.py"))
    below = ["pipeline.py", *(os.path.join("datasets", f) for f in os.listdir(os.path.join(root, "datasets"))
                              if f.endswith(".py"))]
    for name in below:
        assert not {"nnunet_ext.demo", "nnunet_ext.study"} & imported_modules(os.path.join(root, name)), name


def test_dispatch_print_prints_remaining_commands_only(fake_nnunet, capsys):
    done = fake_nnunet.results / RESULT_FOLDER.format(trainer="EncDecTrainer_3labels") / "fold_0" / "validation"
    done.mkdir(parents=True)
    (done / "summary.json").write_text("{}")
    assert study("--trainers", "EncDec", "--labels", "3", "6", "--folds", "0", "1", "--num-gpus", "2",
                 "--dispatch", "print") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["nnUNetv2_train", "nnUNetv2_predict", "nnunet-ext", "nnunet-ext",
                                                   "nnUNetv2_train", "nnUNetv2_train", "nnUNetv2_predict",
                                                   "nnunet-ext", "nnunet-ext"]
    assert lines[0].startswith("nnUNetv2_train 42 3d_fullres 1 -p nnUNetPlans -tr EncDecTrainer_3labels ")
    assert lines[0].endswith("-device cuda --c -num_gpus 2")
    assert "-tr EncDecTrainer_6labels -f 0 1 " in lines[6]
    for line, policy in zip(lines[7:], ("brats", "nan")):  # both empty-mask conventions
        assert line.endswith(f"-o {fake_nnunet.output}/predictions/EncDecTrainer_6labels/folds_0_1/"
                             f"summary_{policy}.json -np 1 --empty-policy {policy}")
    assert fake_nnunet.calls == [] and not (fake_nnunet.output / "study_status.json").exists()


def test_dispatch_print_keeps_data_preparation_output_off_stdout(fake_nnunet, monkeypatch, capsys):
    def prepare_dataset(env, dataset_id, configuration, log_folder, unlabeled, **data):
        print("[prepare] preparing")
        raw = shutil.copytree(fake_nnunet.raw, os.path.join(env["nnUNet_raw"], f"Dataset{dataset_id}_BraTSDemo"))
        preprocessed = pathlib.Path(env["nnUNet_preprocessed"], os.path.basename(raw))
        preprocessed.mkdir()
        write_plans(preprocessed, prepare.PLANS, GROUP_NORM)

    monkeypatch.setattr(prepare, "prepare_synthetic_dataset", prepare_dataset)
    assert cli.main(["study", "--preset", "cpu-smoke", "--trainers", "EncDec", "--dispatch", "print"]) == 0
    out, err = capsys.readouterr()
    assert "[prepare] preparing" in err
    assert [line.split()[0] for line in out.splitlines()] == \
        ["nnUNetv2_train", "nnUNetv2_predict", "nnunet-ext", "nnunet-ext"] * 2


def test_crashed_cell_is_reported_others_continue_and_rerun_skips(fake_nnunet, capsys):
    grid = ("--trainers", "EncDec", "--labels", "2", "3", "4", "--folds", "0", "1")
    fake_nnunet.fail.add(("EncDecTrainer_3labels", 1))
    assert study(*grid) == 1
    out = capsys.readouterr().out
    assert "[study 2/3] EncDecTrainer_3labels fold 1: training" in out
    log_path = os.path.join(fake_nnunet.output, "logs", "train_EncDecTrainer_3labels_fold1.log")
    assert "[study 2/3] EncDecTrainer_3labels: FAILED: command failed" in out and f"(log: {log_path})" in out
    assert "1 of 3 cells failed (details in " in out  # and each failed cell's cause, on the console
    assert "study_status.json):\n  EncDecTrainer_3labels: command failed (exit 1): nnUNetv2_train" in out
    assert len(trainings(fake_nnunet.calls)) == 6
    assert sum(c[0] == "nnUNetv2_predict" for c in fake_nnunet.calls) == 2
    status = json.loads((fake_nnunet.output / "study_status.json").read_text())
    assert {t: s["state"] for t, s in status.items()} == {"EncDecTrainer_2labels": "done",
                                                         "EncDecTrainer_3labels": "failed",
                                                         "EncDecTrainer_4labels": "done"}
    assert status["EncDecTrainer_3labels"]["log"] == log_path
    with open(fake_nnunet.output / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["trainer"] for r in rows} == {"EncDecTrainer_2labels", "EncDecTrainer_4labels"}
    assert {r["region"] for r in rows} == set(REGION_LABELS) - {"background"}
    assert all(float(r["dice"]) == 1.0 and float(r["hd95_mm"]) == 0.0 and r["folds"] == "0 1" for r in rows)

    fake_nnunet.fail.clear()
    fake_nnunet.calls.clear()
    assert study(*grid) == 0
    assert trainings(fake_nnunet.calls) == [("EncDecTrainer_3labels", "1")]
    assert [c[c.index("-tr") + 1] for c in fake_nnunet.calls if c[0] == "nnUNetv2_predict"] == \
        ["EncDecTrainer_3labels"]
    assert "| EncDec | 3 | – | 1.0000 | 1.0000 | 1.0000 | 0.00 | 0.00 | 0.00 |" in \
        (fake_nnunet.output / "results.md").read_text()
    assert (fake_nnunet.output / "fig2_dice_vs_labels.png").read_bytes()[:4] == b"\x89PNG"

    fake_nnunet.calls.clear()
    assert study(*grid) == 0
    assert fake_nnunet.calls == []
    assert "EncDecTrainer_2labels: already evaluated, skipping prediction" in capsys.readouterr().out


def test_rerun_predicts_again_what_is_not_valid_and_reuses_the_rest(fake_nnunet, monkeypatch, capsys):
    written, crash = [], [True]
    train = pipeline.run_command

    def run_command(cmd: list[str], env: dict[str, str], log_path: str, echo: bool = True) -> None:
        """Training as the fake; prediction as --continue_prediction: only cases without an output file."""
        if cmd[0] != "nnUNetv2_predict":
            return train(cmd, env, log_path, echo)
        out = cmd[cmd.index("-o") + 1]
        os.makedirs(out, exist_ok=True)
        for case in ("FAKE_0", "FAKE_1"):
            if not os.path.isfile(os.path.join(out, f"{case}.nii.gz")):
                data = (fake_nnunet.raw / "labelsTs" / f"{case}.nii.gz").read_bytes()
                if crash[0] and case == "FAKE_1":  # killed while writing this file
                    data = data[: len(data) // 2]
                with open(os.path.join(out, f"{case}.nii.gz"), "wb") as f:
                    f.write(data)
                written.append(case)
        if crash[0]:
            raise RuntimeError(f"command failed (exit 1): {' '.join(cmd)}; see {log_path}")

    monkeypatch.setattr(pipeline, "run_command", run_command)
    grid = ("--trainers", "EncDec", "--labels", "3", "--folds", "0")
    predictions = fake_nnunet.output / "predictions" / "EncDecTrainer_3labels" / "folds_0"
    assert study(*grid) == 1 and written == ["FAKE_0", "FAKE_1"]
    crash[0] = False
    written.clear()
    assert study(*grid) == 0
    assert written == ["FAKE_1"]  # the truncated prediction is made again, the complete one reused
    out = capsys.readouterr().out
    assert "predicting FAKE_1 again (" in out and "FAKE_1.nii.gz: truncated or damaged file" in out
    assert (predictions / "rejected" / "FAKE_1.nii.gz").is_file()
    summary = json.loads((predictions / "summary_brats.json").read_text())
    assert summary["foreground_mean"]["Dice"] == 1.0

    # an input image fixed after its prediction, and a prediction off its image's grid: both made again
    os.remove(predictions / "summary_brats.json")
    later = os.path.getmtime(predictions / "FAKE_0.nii.gz") + 10
    os.utime(fake_nnunet.raw / "imagesTs" / "FAKE_0_0000.nii.gz", (later, later))
    flipped = sitk.ReadImage(str(predictions / "FAKE_1.nii.gz"))
    flipped.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(flipped, str(predictions / "FAKE_1.nii.gz"))
    written.clear()
    assert study(*grid) == 0 and written == ["FAKE_0", "FAKE_1"]
    out = capsys.readouterr().out
    assert "predicting FAKE_0 again (older than " in out and "FAKE_0_0000.nii.gz" in out
    assert "predicting FAKE_1 again (direction (-1, 0, 0, 0, 1, 0, 0, 0, 1) vs (1, 0, 0, 0, 1, 0, 0, 0, 1)" in out


def test_damaged_test_image_fails_the_cell_naming_it(fake_nnunet, capsys):
    image = fake_nnunet.raw / "imagesTs" / "FAKE_1_0000.nii.gz"
    image.write_bytes(image.read_bytes()[:-20])  # nnU-Net would predict from zeros
    assert study("--trainers", "EncDec", "--labels", "3", "--folds", "0") == 1
    assert "EncDecTrainer_3labels: FAILED: " in capsys.readouterr().out
    status = json.loads((fake_nnunet.output / "study_status.json").read_text())
    assert "FAKE_1_0000.nii.gz: truncated or damaged file" in status["EncDecTrainer_3labels"]["error"]
    assert not [c for c in fake_nnunet.calls if c[0] == "nnUNetv2_predict"]


def test_a_trained_fold_whose_checkpoint_another_trainer_wrote_fails_its_cell_by_name(fake_nnunet, capsys):
    import torch

    def trained_fold(trainer: str, written_by: str) -> pathlib.Path:
        fold = fake_nnunet.results / RESULT_FOLDER.format(trainer=trainer) / "fold_0"
        (fold / "validation").mkdir(parents=True)
        (fold / "validation" / "summary.json").write_text("{}")
        torch.save({"trainer_name": written_by, "network_weights": {}}, fold / "checkpoint_final.pth")
        return fold

    # a folder renamed from a trainer class that no longer exists, and one that is what its name says
    renamed = trained_fold("EncDecTrainer_3labels", "EncDecConstTrainer_3labels")
    trained_fold("EncDecTrainer_4labels", "EncDecTrainer_4labels")
    assert study("--trainers", "EncDec", "--labels", "3", "4", "--folds", "0") == 1
    out = capsys.readouterr().out
    path = str(renamed / "checkpoint_final.pth")
    assert (f"EncDecTrainer_3labels: FAILED: {path} was written by trainer EncDecConstTrainer_3labels, not "
            "EncDecTrainer_3labels") in out
    assert "Rename the folder back to EncDecConstTrainer_3labels__nnUNetPlans__3d_fullres" in out
    assert "EncDecTrainer_4labels fold 0: already trained, skipping" in out
    assert fake_nnunet.calls and not trainings(fake_nnunet.calls)  # nothing trained over either folder
    assert [c[c.index("-tr") + 1] for c in fake_nnunet.calls] == ["EncDecTrainer_4labels"]  # only it predicted
    status = json.loads((fake_nnunet.output / "study_status.json").read_text())
    assert status["EncDecTrainer_3labels"]["state"] == "failed" and status["EncDecTrainer_4labels"]["state"] == "done"
    assert "EncDecConstTrainer_3labels" in status["EncDecTrainer_3labels"]["error"]
    assert os.path.isfile(path)  # and the foreign checkpoint is left where it was


def test_report_says_how_many_unlabeled_images_each_fold_used(fake_nnunet, ss_base):
    assert study("--trainers", "EncDec", ss_base, "--labels", "3", "--folds", "0", "1") == 0
    table = (fake_nnunet.output / "results.md").read_text()
    assert "| EncDec | 3 | – |" in table and "| ssFake | 3 | all (10–11) |" in table
    with open(fake_nnunet.output / "results.csv", newline="") as f:
        used = {r["trainer"]: r["unlabeled_used"] for r in csv.DictReader(f)}
    assert used == {"EncDecTrainer_3labels": "", "ssFakeTrainer_3labels": "10 11"}


def test_grid_mixing_cpc_with_other_trainers_on_instance_norm_plans_is_refused(fake_nnunet, capsys):
    err = user_error(capsys, "--trainers", "EncDec", "CPCSeg", "ssCPCSeg", "VAESeg", "--labels", "3")
    assert "--trainers CPCSeg ssCPCSeg train the GroupNorm copy of -p nnUNetPlans, whose 3d_fullres networks use " \
           "InstanceNorm3d, so EncDec VAESeg would be compared with another norm" in err
    assert "`nnunet-ext plan -d 42 -pl nnUNetPlannerGN --preprocess -c 3d_fullres` and rerun with " \
           "-p nnUNetGNPlans" in err
    write_plans(fake_nnunet.preprocessed, "nnUNetResEncUNetMPlans", "torch.nn.BatchNorm3d", "nnUNetPlannerResEncM")
    err = user_error(capsys, "--trainers", "CPCSeg", "EncDec", "--labels", "3", "-p", "nnUNetResEncUNetMPlans",
                     "--dispatch", "print")
    assert "use BatchNorm3d" in err and "-pl nnUNetPlannerResEncMGN " in err and "-p nnUNetResEncUNetMGNPlans" in err
    assert fake_nnunet.calls == [] and not fake_nnunet.output.exists()


def results_of(output) -> tuple[str, list[dict]]:
    """The Table 1 of a study's results.md (BraTS convention) and the rows of its results.csv."""
    table = (output / "results.md").read_text().split("## nnU-Net convention")[0]
    with open(output / "results.csv", newline="") as f:
        return table, list(csv.DictReader(f))


def test_table_names_the_plans_and_norm_each_cell_trained_with(fake_nnunet, tmp_path):
    # CPC trainers alone, or no CPC trainer, on InstanceNorm plans: each grid compares like with like
    assert study("--trainers", "CPCSeg", "ssCPCSeg", "--labels", "3", "--folds", "0") == 0
    table, rows = results_of(fake_nnunet.output)
    assert "| repeats | plans (norm) |" in table
    assert "| 1 | nnUNetPlans (GroupNorm) |\n| ssCPCSeg | 3 | all (10) |" in table
    assert {(r["trainer"], r["plans"], r["norm"]) for r in rows} == {
        ("CPCSegTrainer_3labels", "nnUNetPlans", "GroupNorm"), ("ssCPCSegTrainer_3labels", "nnUNetPlans", "GroupNorm")}
    assert study("--trainers", "EncDec", "--labels", "3", "--folds", "0", "--output", str(tmp_path / "encdec")) == 0
    assert "| 1 | nnUNetPlans (InstanceNorm3d) |" in results_of(tmp_path / "encdec")[0]
    # on GroupNorm plans every trainer may be compared
    write_plans(fake_nnunet.preprocessed, "nnUNetGNPlans", GROUP_NORM, "nnUNetPlannerGN")
    assert study("--trainers", "EncDec", "CPCSeg", "--labels", "3", "--folds", "0", "-p", "nnUNetGNPlans") == 0
    table, rows = results_of(fake_nnunet.output)
    assert table.count("| 1 | nnUNetGNPlans (GroupNorm) |") == 2 and {r["norm"] for r in rows} == {"GroupNorm"}


def test_demo_table_shows_the_unlabeled_images_and_plans_each_trainer_trained_with(fake_nnunet, ss_base, monkeypatch,
                                                                                   tmp_path):
    from nnunet_ext import demo

    write_plans(fake_nnunet.preprocessed, prepare.PLANS, GROUP_NORM, "nnUNetPlannerCPUGN")
    monkeypatch.setattr(demo, "prepare_dataset", lambda args, env: str(fake_nnunet.raw))
    assert cli.main(["demo", "-d", "42", "--trainers", "EncDec", ss_base, "--output", str(tmp_path / "demo")]) == 0
    table = (tmp_path / "demo" / "demo_results.md").read_text().splitlines()
    assert table[3].startswith("| ssFake | 6 | all (10–11) | 1.0000 |")  # folds 0 and 1 of the demo
    assert table[0].endswith("| repeats | plans (norm) |")
    assert table[2].startswith("| EncDec | 6 | – | 1.0000 |") and table[2].endswith("| nnUNetCPUGNPlans (GroupNorm) |")


def test_submitit_missing_names_the_install_command(fake_nnunet, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # makes `import submitit` raise ImportError
    with pytest.raises(SystemExit, match="pip install submitit"):
        study("--trainers", "EncDec", "--labels", "3", "--dispatch", "submitit")
    assert fake_nnunet.calls == []


def test_submitit_submits_each_pending_training_fold(fake_nnunet, monkeypatch):
    submitted, parameters = [], {}

    class Executor:
        def __init__(self, folder: str, cluster: str):
            assert cluster == "slurm"

        def update_parameters(self, **kwargs):
            parameters.update(kwargs)

        def submit(self, function):
            submitted.append(function)
            return types.SimpleNamespace(job_id=str(len(submitted)))

    class CommandFunction:
        def __init__(self, command: list[str]):
            self.command = command

    fake = types.SimpleNamespace(AutoExecutor=Executor, helpers=types.SimpleNamespace(CommandFunction=CommandFunction))
    monkeypatch.setitem(sys.modules, "submitit", fake)
    assert study("--trainers", "EncDec", "--labels", "3", "6", "--folds", "0", "1", "--num-gpus", "4",
                 "--dispatch", "submitit", "--slurm", "timeout_min=60", "slurm_partition=gpu") == 0
    assert parameters == {"gpus_per_node": 4, "timeout_min": 60, "slurm_partition": "gpu"}
    assert [(f.command[f.command.index("-tr") + 1], f.command[3]) for f in submitted] == [
        ("EncDecTrainer_3labels", "0"), ("EncDecTrainer_3labels", "1"),
        ("EncDecTrainer_6labels", "0"), ("EncDecTrainer_6labels", "1")]
    assert all(f.command[-2:] == ["-num_gpus", "4"] for f in submitted)
    status = json.loads((fake_nnunet.output / "study_status.json").read_text())
    assert status["EncDecTrainer_6labels"]["state"] == "submitted"
    assert status["EncDecTrainer_6labels"]["jobs"] == {"0": "3", "1": "4"}

    # a rerun while the jobs may still be queued submits nothing again; --resubmit does
    submitted.clear()
    assert study("--trainers", "EncDec", "--labels", "3", "6", "--folds", "0", "1", "--dispatch", "submitit") == 0
    assert submitted == []
    assert json.loads((fake_nnunet.output / "study_status.json").read_text()) == status
    assert study("--trainers", "EncDec", "--labels", "6", "--folds", "0", "1", "--dispatch", "submitit",
                 "--resubmit") == 0
    assert [f.command[3] for f in submitted] == ["0", "1"] and all("--c" in f.command for f in submitted)
    status = json.loads((fake_nnunet.output / "study_status.json").read_text())
    assert status["EncDecTrainer_6labels"]["jobs"] == {"0": "1", "1": "2"}
    assert status["EncDecTrainer_3labels"]["jobs"] == {"0": "1", "1": "2"}  # untouched
    assert fake_nnunet.calls == []


def test_bad_slurm_parameter_is_an_error(fake_nnunet, capsys):
    assert "--slurm: expected KEY=VALUE" in user_error(capsys, "--trainers", "EncDec", "--labels", "3", "--slurm",
                                                       "timeout_min")


@pytest.mark.slow
def test_tiny_real_grid_through_the_cli(tiny_dataset, tmp_path):
    """Two models x 2 repeats through the real commands: per-repeat rows, the paired table, the plots, and a
    rerun that trains and predicts nothing."""
    ds = tiny_dataset
    output = tmp_path / "study"
    cmd = ["nnunet-ext", "study", "-d", str(ds["id"]), "--trainers", "EncDec", "VAESeg", "--labels", "2",
           "--repeats", "2", "--folds", "0", "--epochs", "1", "--iters", "2", "--no-mirroring", "--device", "cpu",
           "-p", "nnUNetCPUPlans", "--output", str(output)]
    env = dict(ds["env"], OMP_NUM_THREADS="1")
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert "[study 4/4] VAESegTrainer_2labels_1epochs_2iters_noMirroring_s1 fold 0: training" in first.stdout
    assert "cells to go, about" in first.stdout
    with open(output / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # 2 models x 2 repeats x 3 regions x both empty-mask conventions
    assert len(rows) == 24 and {r["repeat"] for r in rows} == {"0", "1"} and {r["policy"] for r in rows} == \
        {"brats", "nan"}
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows if r["policy"] == "brats")
    report = (output / "results.md").read_text()
    assert "| model | labels | unlabeled | Dice ET |" in report and "Paired differences to EncDec" in report
    assert "| VAESeg | – | ET | 2 |" in report  # the paired row of VAESeg vs EncDec over both repeats
    assert report.count("| 2 | nnUNetCPUPlans (InstanceNorm3d) |") == 4  # 2 models, both conventions
    curves_table = (output / "training_curves.md").read_text()  # every trained fold's pseudo Dice curve
    assert all(f"| {m} | 2 | {r} | 0 | 1 |" in curves_table for m in ("EncDec", "VAESeg") for r in (0, 1))
    for figure in ("fig2_dice_vs_labels.png", "fig_paired_dice.png", "training_curves.png"):
        assert (output / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labeled = [json.load(open(os.path.join(ds["results"], f"EncDecTrainer_2labels_1epochs_2iters_noMirroring_s{r}"
                                           "__nnUNetCPUPlans__3d_fullres", "fold_0", "labeled_cases.json")))
               for r in (0, 1)]
    assert [x["seed"] for x in labeled] == [0, 1] and labeled[0]["labeled"] != labeled[1]["labeled"]
    checkpoints = [os.path.join(ds["results"], f"{m}Trainer_2labels_1epochs_2iters_noMirroring_s{r}__nnUNetCPUPlans"
                                "__3d_fullres", "fold_0", "checkpoint_final.pth") for m in ("EncDec", "VAESeg")
                   for r in (0, 1)]
    mtimes = [os.path.getmtime(c) for c in checkpoints]

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "nnUNetv2_train" not in second.stdout and "nnUNetv2_predict" not in second.stdout
    assert second.stdout.count("already trained, skipping") == 4
    assert [os.path.getmtime(c) for c in checkpoints] == mtimes


def test_metrics_option_evaluates_them_into_the_tables_and_a_later_run_adds_missing_ones(fake_nnunet, capsys):
    grid = ("--trainers", "EncDec", "--labels", "2", "--folds", "0")
    assert study(*grid, "--metrics", "nsd") == 0
    summary = json.loads((fake_nnunet.output / "predictions" / "EncDecTrainer_2labels" / "folds_0" /
                          "summary_brats.json").read_text())
    assert summary["extra_metrics"] == ["nsd"]
    assert "| NSD ET | NSD TC | NSD WT |" in (fake_nnunet.output / "results.md").read_text()
    fake_nnunet.calls.clear()
    assert study(*grid, "--metrics", "lesionwise", "nsd") == 0  # the summaries lack lesion-wise: evaluated again
    assert [c[0] for c in fake_nnunet.calls] == ["nnUNetv2_predict"]  # --continue_prediction keeps the files
    table = (fake_nnunet.output / "results.md").read_text()
    assert "| lesion-wise Dice ET | lesion-wise Dice TC |" in table
    with open(fake_nnunet.output / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # every lesion has at most 27 mm3, so none is scored: 1 under BraTS's convention, NaN under nnU-Net's
    assert {(r["policy"], r["lesion_dice"], r["nsd"]) for r in rows} == {("brats", "1.0", "1.0"), ("nan", "nan", "1.0")}
    assert (fake_nnunet.output / "predictions" / "EncDecTrainer_2labels" / "folds_0" /
            "summary_brats_lesions.csv").is_file()
    assert study(*grid, "--metrics", "hd99") == 2
    assert "unknown metrics ['hd99']" in capsys.readouterr().err
    assert study(*grid, "--metrics", "hd95-surfels", "--dispatch", "print") == 0  # the summaries lack it
    evaluations = [line for line in capsys.readouterr().out.splitlines() if line.startswith("nnunet-ext evaluate")]
    assert len(evaluations) == 2 and all(line.endswith("--metrics hd95-surfels --overwrite") for line in evaluations)
