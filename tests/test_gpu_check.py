"""benchmarks/gpu_check.py: its readings on hand-made inputs, and the script itself on CPU with --tiny (every phase,
finite values, ratios), cut short by a tiny --budget (partial results, exit 0) and stopped by a missing module."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
PHASES = ["environment", "steps", "commands", "prediction"]


def load_gpu_check():
    """The script as a module (registered, as its dataclasses need)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


gpu_check = load_gpu_check()

LOG = """\
2026-12-06 20:24:45.225485: CPCBranch: 1776704 parameters, arguments {'weight': 0.05, 'chunk_size': None}
2026-12-06 20:24:45.225704: CPCBranch: sub-patch grid (1, 1, 3) (32-voxel sub-patches, stride 16); 3 candidates per \
prediction (chance 1.099)
2026-12-06 20:24:45.519066: Epoch 0
2026-12-06 20:24:45.519185: Current learning rate: 0.01
2026-12-06 20:24:48.380225: seg_loss 0.7664
2026-12-06 20:24:48.380428: branch_loss 0.0548
2026-12-06 20:24:48.380492: unlabeled_branch_loss 0.0560
2026-12-06 20:24:48.712428: train_loss -0.8212
2026-12-06 20:24:48.712682: Pseudo dice [np.float32(0.068), np.float32(0.0096), np.float32(0.0028)]
2026-12-06 20:24:48.712746: Epoch time: 3.19 s
2026-12-06 20:24:48.712786: Yayy! New best EMA pseudo Dice: 0.026799999177455902
2026-12-06 20:24:49.519066: Epoch 1
2026-12-06 20:24:50.380225: seg_loss 0.7001
2026-12-06 20:24:50.380428: branch_loss 0.0400
2026-12-06 20:24:50.380492: unlabeled_branch_loss {unlabeled}
2026-12-06 20:24:50.712428: train_loss -0.8500
2026-12-06 20:24:50.712746: Epoch time: 2.5 s
""".replace("\n", " \n")  # nnU-Net ends its log lines with a space


def test_training_log_values_infonce_and_chance():
    parsed = gpu_check.read_training_log(LOG.replace("{unlabeled}", "0.0545"))
    assert parsed["series"] == {"seg_loss": [0.7664, 0.7001], "branch_loss": [0.0548, 0.04],
                                "unlabeled_branch_loss": [0.056, 0.0545], "train_loss": [-0.8212, -0.85]}
    assert parsed["epoch_time_s"] == [3.19, 2.5] and parsed["cpc"] == {"chance": 1.099, "weight": 0.05}
    summary = gpu_check.loss_summary(parsed, iterations=20)
    assert summary["finite"]
    labeled, unlabeled = summary["info_nce"], summary["unlabeled_info_nce"]
    assert labeled["per_epoch"] == pytest.approx([1.096, 0.8])
    assert labeled["below_chance"] and labeled["verdict"].startswith("below chance after 20 iterations (0.800")
    assert not unlabeled["below_chance"] and unlabeled["verdict"].startswith("at chance")  # 1.090: within 2 %
    assert gpu_check.loss_summary(gpu_check.read_training_log(LOG.replace("{unlabeled}", "nan")), 20)["finite"] is False


def test_step_ratios_use_the_baseline_of_the_same_encoder_and_eager_flops():
    rows = [{"trainer": "nnUNetTrainer", "encoder": "plain", "compiled": False, "status": "ok", "step_ms": 100.0,
             "gflop_per_step": 10.0, "peak_mb": 1000.0, "predict_ms": 5.0},
            {"trainer": "CPCSegTrainer", "encoder": "plain", "compiled": False, "status": "ok", "step_ms": 260.0,
             "gflop_per_step": 26.0, "peak_mb": 1500.0, "predict_ms": 5.5},
            {"trainer": "nnUNetTrainer", "encoder": "plain", "compiled": True, "status": "ok", "step_ms": 80.0,
             "peak_mb": 900.0},
            {"trainer": "CPCSegTrainer", "encoder": "plain", "compiled": True, "status": "ok", "step_ms": 240.0,
             "peak_mb": 1800.0},
            {"trainer": "CPCSegTrainer", "encoder": "resenc", "compiled": False, "status": "skipped: budget"}]
    gpu_check.add_step_ratios(rows)
    eager, compiled = rows[1], rows[3]
    assert (eager["step_x"], eager["flop_x"], eager["memory_x"], eager["predict_x"]) == pytest.approx(
        (2.6, 2.6, 1.5, 1.1))
    assert eager["step_x_over_flop_x"] == pytest.approx(1.0)
    assert (compiled["step_x"], compiled["flop_x"], compiled["memory_x"]) == pytest.approx((3.0, 2.6, 2.0))
    assert compiled["predict_x"] is None and "step_x" not in rows[4]
    text = "\n".join(gpu_check.steps_markdown({"plan": "default-128", "device": "cuda", "warmup": 2, "repeats": 10,
                                               "compile_backend": "inductor", "architectures": {}, "rows": rows}))
    assert "| plain | yes | CPCSegTrainer | 240.0 | 3.00 | - | 2.60 | 1.15 | 1800 | 2.00 |" in text


def test_the_gpu_runs_commands_are_well_formed():
    """What only the GPU run builds: nnU-Net's own planning command, the four trainer names, the entry points."""
    stages = gpu_check.preparation_stages(gpu_check.FULL)
    commands = [str(cmd) for stage in stages for _, cmd, _ in stage]
    assert commands[0].endswith("--shape 155 240 240")
    assert commands[1].startswith("nnUNetv2_plan_and_preprocess -d 980 -c 3d_fullres -np ")
    assert "-pl nnUNetPlannerGN --preprocess" in commands[2] and "-p nnUNetPlans" in commands[3]
    jobs = gpu_check.training_jobs(gpu_check.FULL)
    assert [label for label, _, _ in jobs] == [
        "EncDecTrainer_3epochs_10iters", "CPCSegTrainer_3epochs_10iters", "ssCPCSegTrainer_2labels_3epochs_10iters",
        "MeanTeacherTrainer_2labels_3epochs_10iters"]
    assert [extra["nnUNet_compile"] for _, _, extra in jobs] == ["f", "t", "f", "f"]
    assert all("-device cuda" in str(cmd) for _, cmd, _ in jobs)
    for target in gpu_check.ENTRY_POINTS.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


def test_deadline_alarm_and_phase_status():
    start = time.monotonic()
    with pytest.raises(gpu_check.BudgetExceeded), gpu_check.deadline_alarm(0.2):
        time.sleep(5)
    assert time.monotonic() - start < 2
    assert gpu_check.phase_status(["ok", "ok"]) == "done"
    assert gpu_check.phase_status(["ok", "skipped: budget"]) == "partial: budget"
    assert gpu_check.phase_status(["skipped: budget", "skipped: budget (killed at the deadline)"]) == "skipped: budget"
    assert gpu_check.phase_status(["ok", "failed: exit code 1", "skipped: budget"]) == "failed"


def test_a_deadline_stops_a_step_measurement_and_skips_what_no_longer_fits(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import bench_branches  # noqa: F401  (imported before the deadlines are set, as the script does)

    mode = dataclasses.replace(gpu_check.TINY, min_start_s=0.01, compile_trainers={},
                               step_trainers={"plain": ("nnUNetTrainer", "CPCSegTrainer")})
    def slow_measurement(*args):  # a measurement that would outlast any deadline, with Python code to interrupt
        for _ in range(1000):
            try:
                time.sleep(0.01)
            except Exception:  # what torch or nnU-Net code may do: the deadline must not be swallowed
                pass
        return {"step_ms": 1.0}

    monkeypatch.setattr(gpu_check, "measure_step", slow_measurement)
    budget = gpu_check.Budget(100)
    budget.ends = {"steps": time.monotonic() + 0.5, "compiled steps": time.monotonic() + 0.5}
    report = gpu_check.Report(tmp_path, {"command": "test", "mode": "tiny", "budget_s": 0.5, "started": "now"})
    result = gpu_check.step_benchmarks(mode, budget, report)
    first, second = (r["status"] for r in result["rows"])
    assert first.startswith("skipped: budget (stopped after") and second == "skipped: budget"
    assert result["status"] == "skipped: budget"


def test_a_missing_module_stops_the_check_with_exit_code_2(tmp_path, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):  # main sets them; restored afterwards
        monkeypatch.setenv(var, str(tmp_path))
    monkeypatch.setattr(gpu_check, "MODULES", ("torch", "no_such_module_for_gpu_check"))
    assert gpu_check.main(["--out", str(tmp_path / "out"), "--budget", "30", "--tiny"]) == 2
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    environment = report["phases"]["environment"]
    assert environment["status"] == "failed: missing modules: no_such_module_for_gpu_check"
    assert environment["modules"]["no_such_module_for_gpu_check"].startswith("MISSING: ModuleNotFoundError")
    assert [report["phases"][p]["status"] for p in PHASES[1:]] == ["not started"] * 3
    assert "missing modules" in (tmp_path / "out" / "gpu_check.md").read_text()


def run_script(out: Path, budget: float) -> tuple[subprocess.CompletedProcess, dict, str]:
    """Run ``gpu_check.py --tiny`` as a user does; its exit, JSON and markdown."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out), "--budget", str(budget)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert (out / "gpu_check.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.slow
def test_tiny_run_covers_every_phase(tmp_path):
    from nnunet_ext.branches.cpc import cpc_grid

    proc, report, text = run_script(tmp_path, budget=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert {p: report["phases"][p]["status"] for p in PHASES} == dict.fromkeys(PHASES, "done")
    assert "[gpu_check +" in proc.stdout  # progress with elapsed time

    rows = report["phases"]["steps"]["rows"]
    modes = gpu_check.TINY
    assert len(rows) == sum(map(len, modes.step_trainers.values())) + sum(map(len, modes.compile_trainers.values()))
    for row in rows:
        assert row["status"] == "ok", row
        keys = ["step_ms", "step_x", "flop_x", "step_x_over_flop_x"] + ([] if row["compiled"] else [
            "gflop_per_step", "predict_ms", "predict_x"])
        assert all(finite(row[k]) for k in keys), row
        assert len(row["step_ms_all"]) == 2 and row["memory_x"] is None  # CPU: no CUDA peak memory
    assert all(finite(r["compile_and_first_step_s"]) for r in rows if r["compiled"])

    commands = report["phases"]["commands"]
    assert [c["status"] for c in commands["preparation"]] == ["ok"] * 4
    assert set(commands["plans"]) == {"nnUNetCPUPlans", "nnUNetCPUGNPlans"}
    encdec, sscpc = commands["trainings"]
    for training in (encdec, sscpc):
        assert training["status"] == "ok" and training["checkpoint_final"] and training["finite"], training
        assert len(training["log"]["series"]["train_loss"]) == 1
    grid = cpc_grid(commands["plans"]["nnUNetCPUPlans"]["patch_size"])
    for key in ("info_nce", "unlabeled_info_nce"):
        assert finite(sscpc[key]["per_epoch"][0]) and sscpc[key]["chance"] == pytest.approx(math.log(math.prod(grid)),
                                                                                             abs=1e-3)
    assert commands["prediction"]["status"] == "ok" and commands["prediction"]["trainer"] == sscpc["trainer"]

    prediction = report["phases"]["prediction"]
    assert prediction["baseline"] == encdec["trainer"] and len(prediction["rows"]) == 2
    assert all(finite(r["median_s"]) and finite(r["x_baseline"]) and len(r["all_s"]) == 2 for r in prediction["rows"])
    for heading in ("## Environment", "## Training steps", "## Real commands", "## Prediction time"):
        assert heading in text


@pytest.mark.slow
def test_a_tiny_budget_writes_partial_results_and_exits_0(tmp_path):
    proc, report, text = run_script(tmp_path, budget=8)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    phases = report["phases"]
    assert phases["environment"]["status"] == "done"
    assert phases["steps"]["status"] == "skipped: budget"
    assert all(r["status"] == "skipped: budget" for r in phases["steps"]["rows"])
    assert phases["commands"]["status"].startswith("skipped: budget")
    assert any(c["status"].startswith("skipped: budget") for c in phases["commands"]["preparation"])
    assert phases["prediction"]["status"].startswith("skipped")
    assert "| steps | skipped: budget |" in text
