"""GPU check: the CUDA paths of nnunet_ext, run once and unattended within a time budget, and what they cost.

    python benchmarks/gpu_check.py --out OUT --budget 420          # one GPU: nnU-Net's default 128^3 plans
    python benchmarks/gpu_check.py --out OUT --budget 300 --tiny   # CPU: tiny plans, 2 steps, 1 iteration

Four phases; after each (and after every step benchmark) ``gpu_check.json`` and ``gpu_check.md`` in OUT are
rewritten, so a run that is cut short leaves what it did:

1. environment: GPU, memory, torch / CUDA / cuDNN / nnunetv2 versions, and what is importable (without torch,
   nnU-Net or their dependencies the script stops here with exit code 2);
2. steps: training steps of nnUNetTrainer and the branch trainers at bench_branches' ``default-128`` plan, plain
   and ResEnc M encoder, batch 2, AMP, built and timed in this process with bench_branches' own pieces: median
   step time, FLOPs, ``torch.cuda.max_memory_allocated`` and one-patch prediction, each over nnUNetTrainer's;
   then the same with the network and the Dice loss under ``torch.compile``, as nnU-Net compiles on CUDA;
3. commands: a BraTS-size synthetic dataset (``nnunet-ext make-demo-dataset``), planned by nnU-Net's default
   planner and by ``nnunet-ext plan`` and preprocessed in the background while phase 2 runs; ``nnUNetv2_train``
   of EncDec, CPCSeg, ssCPCSeg and MeanTeacher side by side for a few epochs of a few iterations; their logged
   losses (finite? InfoNCE below chance?); ``nnUNetv2_predict`` of one case;
4. prediction: nnU-Net's sliding-window prediction of one case with each trained checkpoint, over EncDec's.

Phase deadlines are ``--budget`` seconds from the start times the cumulative :data:`SHARES`, so a phase that ends
early leaves its time to the next. What its deadline cuts, or what no longer fits, is recorded as
``skipped: budget``. Exit code 0 when everything that ran worked (skips included), 1 when a measurement or a
command failed, 2 when this environment cannot run the check.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(REPO))  # this checkout's nnunet_ext, also where it is not installed
START = time.monotonic()

SHARES = {"environment": 0.0, "steps": 0.25, "compiled steps": 0.20, "commands": 0.45, "prediction": 0.10}
MODULES = ("torch", "numpy", "scipy", "SimpleITK", "nibabel", "blosc2", "batchgenerators", "batchgeneratorsv2",
           "acvl_utils", "dynamic_network_architectures", "nnunetv2", "nnunet_ext")
BASELINE = "nnUNetTrainer"
STEP_TRAINERS = (BASELINE, "EncDecTrainer", "VAESegTrainer", "BoundSegTrainer", "CPCSegTrainer", "ssCPCSegTrainer",
                 "MeanTeacherTrainer")
# the most telling compiled rows first (compiling at 128^3 takes long)
COMPILE_ORDER = (BASELINE, "CPCSegTrainer", "EncDecTrainer", "ssCPCSegTrainer", "MeanTeacherTrainer",
                 "VAESegTrainer", "BoundSegTrainer")
DATASET_ID = 980
ENTRY_POINTS = {  # the console scripts' entry points
    "nnUNetv2_plan_and_preprocess":
        "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:plan_and_preprocess_entry",
    "nnUNetv2_train": "nnunetv2.run.run_training:run_training_entry",
    "nnUNetv2_predict": "nnunetv2.inference.predict_from_raw_data:predict_entry_point",
    "nnunet-ext": "nnunet_ext.cli:main",
}


@dataclass(frozen=True)
class Training:
    """One ``nnUNetv2_train`` of phase 3: trainer base, plans ('default' or 'groupnorm'), labels, torch.compile."""

    base: str
    plans: str
    labels: int | None
    compile: bool


# EncDec and CPCSeg on the GroupNorm plans (the documented recipe; phase 4 compares their predictions), the
# semi-supervised ones on nnU-Net's default plans (ssCPCSeg trains a GroupNorm copy of them). CPCSeg keeps nnU-Net's
# default, torch.compile on CUDA (the branch inside the compiled module); the others train eagerly, so that a slow
# or failing compilation leaves them their time (phase 2 measures every trainer compiled).
TRAININGS = (Training("EncDecTrainer", "groupnorm", None, False), Training("CPCSegTrainer", "groupnorm", None, True),
             Training("ssCPCSegTrainer", "default", 2, False), Training("MeanTeacherTrainer", "default", 2, False))


@dataclass(frozen=True)
class Mode:
    """What a run measures: the GPU check, or the tiny CPU run that keeps the script working in the test suite."""

    device: str
    step_plan: str | tuple  # a bench_branches PLANS key, or PlanSpec arguments
    warmup: int  # untimed steps before the timed ones; untimed rounds of phase 4
    repeats: int
    step_trainers: dict[str, tuple[str, ...]]  # encoder ('plain', 'resenc') -> trainers, in order
    compile_trainers: dict[str, tuple[str, ...]]
    compile_backend: str
    shape: tuple[int, int, int]  # z, y, x of the synthetic cases
    cases: tuple[int, int, int]  # training, test, unlabeled
    planners: dict[str, tuple[str, str]]  # 'default' / 'groupnorm' -> (planner, plans identifier)
    trainings: tuple[Training, ...]
    epochs: int
    iters: int
    mirroring: bool
    prediction_rounds: int
    min_start_s: float  # a measurement or command starts only with this much of its phase left


FULL = Mode(device="cuda", step_plan="default-128", warmup=2, repeats=10,
            step_trainers={"plain": STEP_TRAINERS, "resenc": STEP_TRAINERS},
            compile_trainers={"plain": COMPILE_ORDER, "resenc": COMPILE_ORDER}, compile_backend="inductor",
            shape=(155, 240, 240), cases=(5, 1, 1), planners={"default": ("ExperimentPlanner", "nnUNetPlans"),
                                                              "groupnorm": ("nnUNetPlannerGN", "nnUNetGNPlans")},
            trainings=TRAININGS, epochs=3, iters=10, mirroring=True, prediction_rounds=5, min_start_s=10)
# Every code path of the GPU run at the least cost: a 32x32x64 patch (CPC's smallest) with 2..8 features; the
# residual encoder for nnUNetTrainer and CPCSeg only; torch.compile with the eager backend (nnU-Net does not compile
# on CPU; this checks that the compiled modules train) for the trainers whose steps differ; the small CPU planners;
# EncDec and ssCPCSeg trained (one on each plans; ssCPCSeg logs the labeled and the unlabeled InfoNCE), no mirroring.
TINY = Mode(device="cpu", step_plan=((32, 32, 64), 2, 8), warmup=0, repeats=2,
            step_trainers={"plain": STEP_TRAINERS, "resenc": (BASELINE, "CPCSegTrainer")},
            compile_trainers={"plain": (BASELINE, "CPCSegTrainer", "ssCPCSegTrainer", "MeanTeacherTrainer")},
            compile_backend="eager",
            shape=(40, 40, 76), cases=(5, 1, 1), planners={"default": ("nnUNetPlannerCPU", "nnUNetCPUPlans"),
                                                           "groupnorm": ("nnUNetPlannerCPUGN", "nnUNetCPUGNPlans")},
            trainings=(TRAININGS[0], TRAININGS[2]), epochs=1, iters=1, mirroring=False, prediction_rounds=2,
            min_start_s=1)


def log(message: str) -> None:
    """A progress line with the time since the start."""
    print(f"[gpu_check +{time.monotonic() - START:6.1f}s] {message}", flush=True)


class BudgetExceeded(BaseException):
    """A phase's deadline passed during a measurement (a BaseException, so that no ``except Exception`` inside
    torch or nnU-Net code swallows it)."""


@contextlib.contextmanager
def deadline_alarm(seconds: float) -> Iterator[None]:
    """Raise :class:`BudgetExceeded` inside the block once ``seconds`` have passed (main thread only)."""
    def expire(signum, frame):
        raise BudgetExceeded

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Budget:
    """Deadlines of the phases (``time.monotonic()``): --budget seconds from the start times cumulative SHARES."""

    def __init__(self, seconds: float):
        shares = list(SHARES.values())
        self.ends = {phase: START + seconds * sum(shares[:i + 1]) for i, phase in enumerate(SHARES)}

    def left(self, phase: str) -> float:
        """Seconds until ``phase`` must end."""
        return self.ends[phase] - time.monotonic()


class Report:
    """The results so far, written as gpu_check.json and gpu_check.md."""

    def __init__(self, out: Path, header: dict):
        self.out = out
        self.data = {**header, "phases": {p: {"status": "not started"} for p in
                                          ("environment", "steps", "commands", "prediction")}}
        out.mkdir(parents=True, exist_ok=True)

    def phase(self, name: str, result: dict) -> None:
        """Record a phase's result with its end time, and write both files."""
        self.data["phases"][name] = {**result, "ended_after_s": round(time.monotonic() - START, 1)}
        self.write()

    def write(self) -> None:
        """Replace gpu_check.json and gpu_check.md (each written whole, then moved into place)."""
        self.data["elapsed_s"] = round(time.monotonic() - START, 1)
        for name, text in (("gpu_check.json", json.dumps(self.data, indent=1, default=str) + "\n"),
                           ("gpu_check.md", markdown(self.data))):
            partial = self.out / f"{name}.partial"
            partial.write_text(text)
            os.replace(partial, self.out / name)


def phase_status(statuses) -> str:
    """'failed' when an item failed, 'done' when all are ok, 'skipped: budget' when none ran, else 'partial: budget'."""
    statuses = list(statuses)
    if any(s.startswith("failed") for s in statuses):
        return "failed"
    if all(s == "ok" for s in statuses):
        return "done"
    return "skipped: budget" if all(s.startswith("skipped") for s in statuses) else "partial: budget"


# -- phase 1: environment -----------------------------------------------------------------------------------------


def importable() -> dict[str, str]:
    """Version, or 'MISSING: why', of every module the check needs."""
    from importlib import metadata

    found = {}
    for name in MODULES:
        try:
            version = getattr(importlib.import_module(name), "__version__", None)
        except Exception as error:  # whatever breaks the import, the check cannot run here
            found[name] = f"MISSING: {type(error).__name__}: {error}"
            continue
        with contextlib.suppress(metadata.PackageNotFoundError):
            version = version or metadata.version(name)
        found[name] = str(version or "installed")
    return found


def environment(mode: Mode) -> dict:
    """Phase 1: device, memory and library versions; ``missing`` lists what cannot be imported."""
    modules = importable()
    for name, version in modules.items():
        log(f"{name}: {version}")
    result = {"python": platform.python_version(), "executable": sys.executable, "cpus": os.cpu_count(),
              "git": git_revision(), "modules": modules,
              "missing": [n for n, v in modules.items() if v.startswith("MISSING")]}
    if "torch" not in result["missing"]:
        import torch

        result.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                      cuda_available=torch.cuda.is_available(), device=mode.device)
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            result.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1))
    return result


def git_revision() -> str | None:
    """``git describe --always --dirty`` of this checkout, or None where git or its history is absent."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    return None


def environment_problem(env: dict, mode: Mode) -> str | None:
    """Why this environment cannot run the check, or None."""
    if env["missing"]:
        return "missing modules: " + ", ".join(env["missing"])
    if mode.device == "cuda" and not env["cuda_available"]:
        return "torch sees no CUDA device (--tiny runs on CPU)"
    return None


# -- phase 2: training steps --------------------------------------------------------------------------------------


def step_architecture(mode: Mode, encoder: str):
    """bench_branches' planned architecture for the step benchmarks (encoder 'plain' or 'resenc')."""
    import bench_branches as bb

    spec = bb.PLANS[mode.step_plan] if isinstance(mode.step_plan, str) else bb.PlanSpec(*mode.step_plan)
    return bb.planned_architecture(spec, residual=encoder == "resenc")


def compile_like_nnunet(setup, backend: str) -> None:
    """``torch.compile`` what nnUNetTrainer compiles on CUDA: the network and the Dice part of the loss."""
    import torch
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss

    setup.network = torch.compile(setup.network, backend=backend)
    for loss in [m for m in setup.loss.modules() if isinstance(m, DC_and_BCE_loss)]:
        loss.dc = torch.compile(loss.dc, backend=backend)


def release_memory(device) -> None:
    """Free what earlier measurements left (on CUDA also the allocator's cache, for the next one or phase 3)."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_step(trainer: str, arch, mode: Mode, compiled: bool) -> dict:
    """Median training step and peak memory of one trainer, eagerly also FLOPs and one-patch prediction; built and
    timed with bench_branches' ``training_setup``, ``timed`` and ``prediction_network``."""
    import bench_branches as bb
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device(mode.device)
    torch.manual_seed(0)
    release_memory(device)  # what the previous trainer left
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net's run_training
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    setup = bb.training_setup(bb.TRAINERS[trainer], arch, device, None)
    row: dict = {}
    if compiled:
        torch._dynamo.reset()  # every trainer compiles afresh, far from the recompile limit
        compile_like_nnunet(setup, mode.compile_backend)
        start = time.perf_counter()
        row["first_loss"] = setup.step()
        bb.synchronize(device)
        row["compile_and_first_step_s"] = time.perf_counter() - start
    times = bb.timed(setup.step, device, mode.warmup, mode.repeats)
    row.update(step_ms=statistics.median(times), step_ms_all=times)
    if device.type == "cuda":
        row.update(peak_mb=(torch.cuda.max_memory_allocated(device) - before) / 2 ** 20,
                   reserved_mb=torch.cuda.max_memory_reserved(device) / 2 ** 20)
    if not compiled:
        with FlopCounterMode(display=False) as flops:
            row["last_loss"] = setup.step()
        row["gflop_per_step"] = flops.get_total_flops() / 1e9
        predictor, patch = bb.prediction_network(setup, arch, device), setup.data[:1]

        def predict() -> None:
            with torch.inference_mode(), bb.autocast(device):
                predictor(patch)

        row["predict_ms"] = statistics.median(bb.timed(predict, device, mode.warmup, mode.repeats))
    return row


def step_benchmarks(mode: Mode, budget: Budget, report: Report) -> dict:
    """Phase 2: the mode's trainers on each encoder, eagerly until the 'steps' deadline, then compiled until the
    'compiled steps' deadline; a row that does not fit is skipped, one that fails does not stop the others."""
    rows = [{"trainer": trainer, "encoder": encoder, "compiled": compiled, "status": "pending"}
            for compiled in (False, True)
            for encoder, trainers in (mode.compile_trainers if compiled else mode.step_trainers).items()
            for trainer in trainers]
    result = {"plan": mode.step_plan if isinstance(mode.step_plan, str) else "tiny", "device": mode.device,
              "warmup": mode.warmup, "repeats": mode.repeats, "compile_backend": mode.compile_backend,
              "architectures": {}, "rows": rows}
    if budget.left("compiled steps") < mode.min_start_s:
        for row in rows:
            row["status"] = "skipped: budget"
        return {**result, "status": "skipped: budget"}
    import bench_branches  # noqa: F401  (imported here, where no deadline alarm can cut an import short)
    import torch
    import torch._dynamo
    import torch.utils.flop_counter  # noqa: F401

    archs = {}
    for row in rows:
        phase = "compiled steps" if row["compiled"] else "steps"
        left = budget.left(phase)
        if left < mode.min_start_s:
            row["status"] = "skipped: budget"
            continue
        what = f"{row['trainer']}, {row['encoder']} encoder{', compiled' if row['compiled'] else ''}"
        log(f"steps: {what} ({left:.0f} s left)")
        start = time.perf_counter()
        try:
            with deadline_alarm(left):
                if row["encoder"] not in archs:
                    archs[row["encoder"]] = arch = step_architecture(mode, row["encoder"])
                    result["architectures"][row["encoder"]] = {
                        "network": arch.network_class_name.rsplit(".", 1)[1], "patch_size": list(arch.patch_size),
                        "batch_size": arch.batch_size, "features_per_stage": arch.arch_kwargs["features_per_stage"]}
                row.update(measure_step(row["trainer"], archs[row["encoder"]], mode, row["compiled"]), status="ok")
        except BudgetExceeded:
            row["status"] = f"skipped: budget (stopped after {time.perf_counter() - start:.0f} s)"
        except Exception as error:  # a failing trainer is a result; the others still run
            row["status"] = f"failed: {type(error).__name__}: {str(error)[:300]}"
        finally:
            if row["compiled"]:
                torch._dynamo.reset()
        row["seconds"] = round(time.perf_counter() - start, 1)
        log(f"steps: {what}: {row['status']}" + (f", {row['step_ms']:.1f} ms" if "step_ms" in row else ""))
        add_step_ratios(rows)
        report.phase("steps", {**result, "status": "running"})
    release_memory(torch.device(mode.device))
    return {**result, "status": phase_status(row["status"] for row in rows)}


def add_step_ratios(rows: list[dict]) -> None:
    """Step, FLOP, memory and prediction ratios of each measured row to nnUNetTrainer's row of the same encoder and
    compile setting (FLOPs of the eager rows: compiling changes none), and step ratio ÷ FLOP ratio (1.10: 10 %
    above the FLOP floor)."""
    measured = {(r["trainer"], r["encoder"], r["compiled"]): r for r in rows if r["status"] == "ok"}
    for (trainer, encoder, compiled), row in measured.items():
        base = measured.get((BASELINE, encoder, compiled), {})
        flops = measured.get((trainer, encoder, False), {}).get("gflop_per_step")
        base_flops = measured.get((BASELINE, encoder, False), {}).get("gflop_per_step")
        row.update({f"{key}_x": ratio(row.get(unit), base.get(unit))
                    for key, unit in (("step", "step_ms"), ("memory", "peak_mb"), ("predict", "predict_ms"))})
        row["flop_x"] = ratio(flops, base_flops)
        row["step_x_over_flop_x"] = ratio(row["step_x"], row["flop_x"])


def ratio(value: float | None, base: float | None) -> float | None:
    """``value / base``, or None without both."""
    return value / base if value is not None and base else None


# -- phase 3: the real commands -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A console script of nnU-Net or nnunet_ext with its arguments, run with this interpreter (needs no PATH, also
    where the packages were installed with ``pip --target``)."""

    name: str
    args: tuple[str, ...]

    @property
    def argv(self) -> list[str]:
        module, function = ENTRY_POINTS[self.name].split(":")
        code = f"import sys; from {module} import {function}; sys.argv[0] = {self.name!r}; sys.exit({function}())"
        return [sys.executable, "-c", code, *self.args]

    def __str__(self) -> str:
        return " ".join([self.name, *self.args])


def command(name: str, *args) -> Command:
    """``Command(name, args)`` with every argument as a string."""
    return Command(name, tuple(map(str, args)))


class Runner:
    """Runs commands side by side with a deadline, each one's output in a log file; kills what is left when asked."""

    def __init__(self, logs: Path, env: dict[str, str]):
        self.logs, self.env = logs, env
        self.running: set[subprocess.Popen] = set()
        self.killed: dict[subprocess.Popen, str] = {}  # by kill_all, with the reason
        self.lock = threading.Lock()
        logs.mkdir(parents=True, exist_ok=True)

    def run(self, jobs: list[tuple[str, Command, dict]], deadline: float) -> list[dict]:
        """Start ``jobs`` (label, command, extra environment) together; wait for them until ``deadline``
        (``time.monotonic()``), kill the rest; one result per job."""
        started = []
        for label, cmd, extra in jobs:
            log(f"$ {cmd}")
            with open(self.logs / f"{label}.log", "w") as out:
                proc = subprocess.Popen(cmd.argv, env={**self.env, **extra}, stdout=out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            with self.lock:
                self.running.add(proc)
            started.append((label, cmd, proc, time.monotonic()))
        results = []
        for label, cmd, proc, begin in started:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
                status = "ok" if proc.returncode == 0 else f"failed: exit code {proc.returncode}"
            except subprocess.TimeoutExpired:
                status = "skipped: budget (killed at the deadline)"
            self.kill(proc)
            status = self.killed.pop(proc, status)
            result = {"label": label, "command": str(cmd), "status": status,
                      "seconds": round(time.monotonic() - begin, 1)}
            if status != "ok":
                result["tail"] = (self.logs / f"{label}.log").read_text(errors="replace")[-2500:]
            log(f"{label}: {status} ({result['seconds']} s)")
            results.append(result)
        return results

    def kill(self, proc: subprocess.Popen) -> None:
        """Kill a command and whatever it started (its process group), and forget it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        with self.lock:
            self.running.discard(proc)

    def kill_all(self, reason: str) -> None:
        """Kill every command still running; their results say ``reason``."""
        with self.lock:
            running = list(self.running)
            self.killed.update(dict.fromkeys(running, reason))
        for proc in running:
            self.kill(proc)


@dataclass(frozen=True)
class Folders:
    """nnU-Net's three folders under ``work`` and this run's dataset in them."""

    work: Path
    dataset = f"Dataset{DATASET_ID:03d}_BraTSDemo"  # what make-demo-dataset names it

    @property
    def env(self) -> dict[str, str]:
        return {var: str(self.work / var) for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}

    @property
    def raw(self) -> Path:
        return self.work / "nnUNet_raw" / self.dataset

    @property
    def preprocessed(self) -> Path:
        return self.work / "nnUNet_preprocessed" / self.dataset

    def fold(self, trainer: str, plans: str) -> Path:
        """Fold 0 of a training's results folder."""
        return self.work / "nnUNet_results" / self.dataset / f"{trainer}__{plans}__3d_fullres" / "fold_0"


def preparation_stages(mode: Mode) -> list[list[tuple[str, Command, dict]]]:
    """The dataset; nnU-Net's default plans (with the fingerprint); then side by side the GroupNorm plans and the
    unlabeled images preprocessed for the default plans. Planning uses half the cores (at most 8) on the GPU
    machine, where phase 2 runs meanwhile."""
    n = 1 if mode.device == "cpu" else max(1, min(8, (os.cpu_count() or 2) // 2))
    (default_planner, default_plans), (gn_planner, _) = mode.planners["default"], mode.planners["groupnorm"]
    train, test, unlabeled = mode.cases
    if default_planner == "ExperimentPlanner":  # nnU-Net's default planner, through nnU-Net's own command
        plan_default = command("nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-np", n)
    else:
        plan_default = command("nnunet-ext", "plan", "-d", DATASET_ID, "-pl", default_planner, "--preprocess",
                               "-np", n)
    return [[("make-demo-dataset", command("nnunet-ext", "make-demo-dataset", "-d", DATASET_ID, "--num-train", train,
                                           "--num-test", test, "--num-unlabeled", unlabeled, "--shape", *mode.shape),
              {})],
            [("plan-default", plan_default, {})],
            [("plan-groupnorm", command("nnunet-ext", "plan", "-d", DATASET_ID, "-pl", gn_planner, "--preprocess",
                                        "-np", n), {}),
             ("preprocess-unlabeled", command("nnunet-ext", "preprocess-unlabeled", "-d", DATASET_ID, "-p",
                                              default_plans, "-np", n), {})]]


class Preparation(threading.Thread):
    """Runs :func:`preparation_stages` in the background (CPU work, while phase 2 uses the GPU)."""

    def __init__(self, runner: Runner, mode: Mode, deadline: float):
        super().__init__(daemon=True)
        self.runner, self.mode, self.deadline = runner, mode, deadline
        self.results: list[dict] = []

    def run(self) -> None:
        for stage in preparation_stages(self.mode):
            fits = self.deadline - time.monotonic() >= self.mode.min_start_s
            if self.ok and fits:
                self.results.extend(self.runner.run(stage, self.deadline))
                continue
            reason = "skipped: budget" if self.ok else "skipped: an earlier command did not finish"
            self.results.extend({"label": label, "command": str(cmd), "status": reason} for label, cmd, _ in stage)

    @property
    def ok(self) -> bool:
        """Whether every command so far finished well."""
        return all(r["status"] == "ok" for r in self.results)


def trainer_of(training: Training, mode: Mode) -> str:
    """The trainer name of a phase-3 training, e.g. ssCPCSegTrainer_2labels_3epochs_10iters."""
    from nnunet_ext.trainers.names import trainer_name

    return trainer_name(training.base, training.labels, epochs=mode.epochs, iters=mode.iters,
                        mirroring=mode.mirroring)


def training_jobs(mode: Mode) -> list[tuple[str, Command, dict]]:
    """``nnUNetv2_train`` of the mode's trainings, with augmentation workers that share the machine's cores."""
    workers = 0 if mode.device == "cpu" else max(1, ((os.cpu_count() or 4) - 4) // len(mode.trainings))
    jobs = []
    for training in mode.trainings:
        trainer = trainer_of(training, mode)
        extra = {"nnUNet_n_proc_DA": str(workers), "nnUNet_def_n_proc": "1" if mode.device == "cpu" else "2",
                 "nnUNet_compile": "t" if training.compile else "f"}  # "t": nnU-Net's default on CUDA
        jobs.append((trainer, command("nnUNetv2_train", DATASET_ID, "3d_fullres", 0, "-p",
                                      mode.planners[training.plans][1], "-tr", trainer, "-device", mode.device),
                     extra))
    return jobs


LOG_VALUE = re.compile(r"^(?:\S+ \S+: )?([A-Za-z_]+) (-?(?:\d+(?:\.\d*)?(?:e[-+]?\d+)?|nan|inf))$")


def read_training_log(text: str) -> dict:
    """Per-epoch values of an nnU-Net training log (``train_loss``, ``val_loss``, ``seg_loss``, ``branch_loss``,
    ``unlabeled_branch_loss``, ...), epoch times, and the CPC branch's weight and chance level where it logs them."""
    series: dict[str, list[float]] = {}
    for line in text.splitlines():
        match = LOG_VALUE.match(line.strip())
        if match and match.group(1) != "Epoch":
            series.setdefault(match.group(1), []).append(float(match.group(2)))
    result = {"series": series, "epoch_time_s": [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", text)]}
    chance = re.search(r"CPCBranch: .*\(chance ([0-9.]+)\)", text)
    weight = re.search(r"CPCBranch: .*arguments \{.*'weight': ([0-9.e-]+)", text)
    if chance and weight:
        result["cpc"] = {"chance": float(chance.group(1)), "weight": float(weight.group(1))}
    return result


CHANCE_MARGIN = 0.02  # InfoNCE within 2 % of chance counts as at chance (the log rounds the branch loss to 1e-4)


def loss_summary(parsed: dict, iterations: int) -> dict:
    """Whether every logged value is finite; for CPC the InfoNCE per epoch (branch loss ÷ weight) and where the last
    epoch's lies: below, at (within CHANCE_MARGIN) or above chance (ln of the candidates per prediction)."""
    values = [v for series in parsed["series"].values() for v in series]
    summary: dict = {"finite": bool(values) and all(math.isfinite(v) for v in values)}
    cpc = parsed.get("cpc")
    for key, name in (("branch_loss", "info_nce"), ("unlabeled_branch_loss", "unlabeled_info_nce")):
        if cpc and parsed["series"].get(key):
            info_nce = [v / cpc["weight"] for v in parsed["series"][key]]
            of_chance = info_nce[-1] / cpc["chance"]
            where = "below" if of_chance < 1 - CHANCE_MARGIN else "above" if of_chance > 1 + CHANCE_MARGIN else "at"
            summary[name] = {"per_epoch": info_nce, "chance": cpc["chance"], "last_of_chance": of_chance,
                             "below_chance": where == "below",
                             "verdict": f"{where} chance after {iterations} iterations ({info_nce[-1]:.3f}, "
                                        f"{of_chance:.2f}x chance {cpc['chance']:.3f})"}
    return summary


def read_training(training: Training, mode: Mode, folders: Folders, status: dict) -> dict:
    """What a phase-3 training left: its command's status, the parsed log, the loss summary, checkpoint_final."""
    trainer, plans = trainer_of(training, mode), mode.planners[training.plans][1]
    fold = folders.fold(trainer, plans)
    row = {**status, "trainer": trainer, "plans": plans, "compile": training.compile and mode.device == "cuda",
           "checkpoint_final": (fold / "checkpoint_final.pth").is_file()}
    logs = sorted(fold.glob("training_log_*.txt"))
    if logs:
        row["log"] = read_training_log(logs[-1].read_text(errors="replace"))
        row.update(loss_summary(row["log"], mode.epochs * mode.iters))
    return row


def plans_summary(folders: Folders, mode: Mode) -> dict:
    """3d_fullres patch, batch, network, features and norm of both plans, as the planners wrote them."""
    summary = {}
    for planner, identifier in mode.planners.values():
        path = folders.preprocessed / f"{identifier}.json"
        if path.is_file():
            config = json.loads(path.read_text())["configurations"]["3d_fullres"]
            arch = config["architecture"]
            summary[identifier] = {"planner": planner, "patch_size": config["patch_size"],
                                   "batch_size": config["batch_size"],
                                   "network": arch["network_class_name"].rsplit(".", 1)[1],
                                   "features_per_stage": arch["arch_kwargs"]["features_per_stage"],
                                   "norm_op": arch["arch_kwargs"].get("norm_op")}
    return summary


def first_test_case(folders: Folders) -> str:
    """The id of the first labeled test case (imagesTs / labelsTs)."""
    return sorted(p.name[:-len(".nii.gz")] for p in (folders.raw / "labelsTs").glob("*.nii.gz"))[0]


def real_commands(mode: Mode, budget: Budget, runner: Runner, preparation: Preparation, folders: Folders) -> dict:
    """Phase 3: wait for the dataset, train side by side, read the logs, predict one case."""
    result: dict = {"dataset": {"shape_zyx": list(mode.shape), "train_test_unlabeled": list(mode.cases)}}
    while preparation.is_alive() and budget.left("commands") > 0:
        log(f"commands: waiting for the dataset preparation ({budget.left('commands'):.0f} s left)")
        preparation.join(timeout=min(15, max(budget.left("commands"), 0.01)))
    if preparation.is_alive():
        runner.kill_all("skipped: budget (killed at the deadline)")
    preparation.join()
    result.update(preparation=preparation.results, plans=plans_summary(folders, mode))
    if not preparation.ok:
        failed = any(r["status"].startswith("failed") for r in preparation.results)
        return {**result, "status": "failed: dataset preparation" if failed else "skipped: budget (preparation)"}
    predict_reserve = 0.15 * budget.left("commands")
    if budget.left("commands") - predict_reserve < mode.min_start_s:
        return {**result, "status": "skipped: budget"}
    statuses = runner.run(training_jobs(mode), time.monotonic() + budget.left("commands") - predict_reserve)
    result["trainings"] = trainings = [read_training(t, mode, folders, s) for t, s in zip(mode.trainings, statuses)]
    result["prediction"] = predict_one_case(mode, budget, runner, folders, trainings)
    statuses = [t["status"] for t in trainings] + [result["prediction"]["status"]]
    statuses += [f"failed: {t['trainer']} logged a value that is not finite" for t in trainings
                 if t.get("finite") is False]
    return {**result, "status": phase_status(statuses)}


def predict_one_case(mode: Mode, budget: Budget, runner: Runner, folders: Folders, trainings: list[dict]) -> dict:
    """``nnUNetv2_predict`` of the first test case with the first finished training, preferably a CPC trainer on
    the default plans (its results folder holds the GroupNorm copy of them that nnUNetv2_predict builds)."""
    default_plans = mode.planners["default"][1]
    finished = sorted((t for t in trainings if t["checkpoint_final"]),
                      key=lambda t: ("CPC" not in t["trainer"], t["plans"] != default_plans))
    if not finished:
        return {"status": "skipped: no training finished"}
    if budget.left("commands") < mode.min_start_s:
        return {"status": "skipped: budget"}
    chosen, case = finished[0], first_test_case(folders)
    inputs, output = folders.work / "predict_input", folders.work / "predict_output"
    inputs.mkdir(exist_ok=True)
    for image in (folders.raw / "imagesTs").glob(f"{case}_*.nii.gz"):
        shutil.copy(image, inputs / image.name)
    sequential = ("-npp", 0, "-nps", 0) if mode.device == "cpu" else ()  # no worker start-up on CPU
    cmd = command("nnUNetv2_predict", "-i", inputs, "-o", output, "-d", DATASET_ID, "-c", "3d_fullres",
                  "-p", chosen["plans"], "-tr", chosen["trainer"], "-f", 0, "-device", mode.device, *sequential)
    status = runner.run([("predict", cmd, {})], time.monotonic() + budget.left("commands"))[0]
    if status["status"] == "ok" and not (output / f"{case}.nii.gz").is_file():
        status["status"] = f"failed: no {case}.nii.gz written"
    return {**status, "trainer": chosen["trainer"], "case": case}


# -- phase 4: prediction time -------------------------------------------------------------------------------------


def prediction_times(mode: Mode, budget: Budget, folders: Folders, trainings: list[dict]) -> dict:
    """Phase 4: nnU-Net's sliding-window prediction of one test case with each finished checkpoint, in alternating
    rounds; medians over EncDec's (else the first checkpoint's), noise = (max - min) / median of the repeats."""
    finished = [t for t in trainings if t["checkpoint_final"]]
    finished.sort(key=lambda t: not t["trainer"].startswith("EncDec"))  # the baseline first
    if len(finished) < 2:
        return {"status": "skipped: fewer than two finished trainings (phase 3)"}
    if budget.left("prediction") < mode.min_start_s:
        return {"status": "skipped: budget"}
    import nnunetv2.inference.predict_from_raw_data  # noqa: F401  (before the alarm: never cut an import)

    try:
        with deadline_alarm(budget.left("prediction")):
            times = time_predictions(mode, folders, finished)
    except BudgetExceeded:
        return {"status": "skipped: budget"}
    base = times[finished[0]["trainer"]]
    base_noise = (max(base) - min(base)) / statistics.median(base)
    rows = []
    for training in finished:
        seconds = times[training["trainer"]]
        median, noise = statistics.median(seconds), (max(seconds) - min(seconds)) / statistics.median(seconds)
        x = median / statistics.median(base)
        rows.append({"trainer": training["trainer"], "plans": training["plans"], "median_s": median,
                     "all_s": seconds, "noise": noise, "x_baseline": x,
                     "verdict": "equal within noise" if abs(x - 1) <= max(noise, base_noise) else "differs"})
    return {"status": "done", "baseline": finished[0]["trainer"], "case": first_test_case(folders),
            "warmup": mode.warmup, "rounds": mode.prediction_rounds, "rows": rows,
            "how": "nnUNetPredictor.predict_sliding_window_return_logits (tile step 0.5, no mirroring) of the case "
                   "preprocessed for the checkpoint's plans, fold 0's checkpoint_final.pth"}


def time_predictions(mode: Mode, folders: Folders, finished: list[dict]) -> dict[str, list[float]]:
    """Seconds per prediction of the test case, per trainer, after ``mode.warmup`` untimed rounds."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    device = torch.device(mode.device)
    images = sorted(str(p) for p in (folders.raw / "imagesTs").glob(f"{first_test_case(folders)}_*.nii.gz"))
    predictors, inputs = {}, {}
    for training in finished:
        predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=device, allow_tqdm=False,
                                    perform_everything_on_device=device.type == "cuda")
        predictor.initialize_from_trained_model_folder(str(folders.fold(training["trainer"], training["plans"]).parent),
                                                       use_folds=(0,))
        if training["plans"] not in inputs:
            preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
            data, _, _ = preprocessor.run_case(images, None, predictor.plans_manager, predictor.configuration_manager,
                                               predictor.dataset_json)
            inputs[training["plans"]] = torch.from_numpy(data)
        predictors[training["trainer"]] = predictor, inputs[training["plans"]]
    times: dict[str, list[float]] = {name: [] for name in predictors}
    for round_ in range(-mode.warmup, mode.prediction_rounds):  # negative rounds warm up (cuDNN autotuning)
        for name, (predictor, data) in predictors.items():
            start = time.perf_counter()
            predictor.predict_sliding_window_return_logits(data)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_ >= 0:
                times[name].append(time.perf_counter() - start)
        log(f"prediction: round {round_ + 1} of {mode.prediction_rounds} done")
    return times


# -- gpu_check.md -------------------------------------------------------------------------------------------------


def fmt(value, digits: int = 2) -> str:
    """A number for a table cell; '-' when absent."""
    return "-" if value is None else f"{value:.{digits}f}"


def table(header: list[str], rows: list[list]) -> list[str]:
    """Markdown table lines; columns of numbers (or '-') right-aligned."""
    def numeric(column: int) -> bool:
        return bool(rows) and all(re.fullmatch(r"-|-?[\d.]+", str(row[column])) for row in rows)

    align = ["---:" if numeric(c) else "---" for c in range(len(header))]
    return [f"| {' | '.join(header)} |", f"|{'|'.join(align)}|"] + [f"| {' | '.join(map(str, r))} |" for r in rows]


def markdown(data: dict) -> str:
    """gpu_check.md: phase statuses, environment, and the tables of phases 2-4."""
    phases, env = data["phases"], data["phases"]["environment"]
    lines = ["# GPU check", "", f"`{data['command']}` ({data['mode']} mode), started {data['started']}, budget "
             f"{data['budget_s']:.0f} s, {data.get('elapsed_s', 0):.0f} s so far.", ""]
    lines += table(["phase", "status", "ended after s"],
                   [[name, p["status"], p.get("ended_after_s", "-")] for name, p in phases.items()])
    lines += ["", "## Environment", ""] + [f"- {key}: {env[key]}" for key in (
        "gpu", "gpu_memory_gib", "torch", "cuda", "cudnn", "python", "executable", "cpus", "git") if key in env]
    lines += [f"- {name}: {version}" for name, version in env.get("modules", {}).items()]
    return "\n".join(lines + steps_markdown(phases["steps"]) + commands_markdown(phases["commands"])
                     + prediction_markdown(phases["prediction"])) + "\n"


def steps_markdown(phase: dict) -> list[str]:
    """Phase 2's table."""
    if not phase.get("rows"):
        return []
    archs = "; ".join(f"{name}: {a['network']}, patch {a['patch_size']}, batch {a['batch_size']}, features "
                      f"{a['features_per_stage']}" for name, a in phase["architectures"].items())
    lines = ["", "## Training steps", "",
             f"bench_branches' `{phase['plan']}` plan ({archs}) on {phase['device']}; {phase['warmup']} warm-up + "
             f"{phase['repeats']} timed steps, median. ×: over nnUNetTrainer with the same encoder and compile "
             "setting. FLOPs counted in an eager step; step× ÷ FLOP× = 1.10 is 10 % above the FLOP floor. Compiled: "
             f"torch.compile (backend {phase['compile_backend']}) of the network and the Dice loss, as nnU-Net does "
             "on CUDA; 'compile s' is the first step, compilation included. Peak MB: torch.cuda.max_memory_allocated "
             "(CUDA only).", ""]
    header = ["encoder", "compiled", "trainer", "step ms", "step ×", "GFLOP", "FLOP ×", "step× ÷ FLOP×", "peak MB",
              "memory ×", "predict ms", "predict ×", "compile s", "status"]
    rows = [[r["encoder"], "yes" if r["compiled"] else "no", r["trainer"], fmt(r.get("step_ms"), 1),
             fmt(r.get("step_x")), fmt(r.get("gflop_per_step"), 1), fmt(r.get("flop_x")),
             fmt(r.get("step_x_over_flop_x")), fmt(r.get("peak_mb"), 0), fmt(r.get("memory_x")),
             fmt(r.get("predict_ms"), 1), fmt(r.get("predict_x")), fmt(r.get("compile_and_first_step_s"), 1),
             r["status"]] for r in phase["rows"]]
    return lines + table(header, rows)


def commands_markdown(phase: dict) -> list[str]:
    """Phase 3's commands, plans and training losses."""
    if "preparation" not in phase:
        return []
    dataset = phase["dataset"]
    lines = ["", "## Real commands", "", f"Synthetic dataset of `nnunet-ext make-demo-dataset`: z y x "
             f"{dataset['shape_zyx']}, training / test / unlabeled cases {dataset['train_test_unlabeled']}.", ""]
    commands = phase["preparation"] + phase.get("trainings", []) + [phase.get("prediction", {})]
    lines += table(["command", "status", "s"], [[f"`{c['command']}`", c["status"], c.get("seconds", "-")]
                                                for c in commands if "command" in c])
    lines += [""] + table(["plans", "planner", "patch", "batch", "network", "features", "norm"], [
        [name, p["planner"], p["patch_size"], p["batch_size"], p["network"], p["features_per_stage"], p["norm_op"]]
        for name, p in phase["plans"].items()])
    if not phase.get("trainings"):
        return lines
    lines += ["", "Per-epoch means of the training logs, first → last epoch; InfoNCE = branch loss ÷ CPC weight.", ""]
    rows = []
    for t in phase["trainings"]:
        series, times = t.get("log", {}).get("series", {}), t.get("log", {}).get("epoch_time_s") or [None]

        def trend(key: str, series=series) -> str:
            return f"{series[key][0]:.4f} → {series[key][-1]:.4f}" if series.get(key) else "-"

        rows.append([t["trainer"], t["plans"], "yes" if t["compile"] else "no", len(series.get("train_loss", [])),
                     fmt(times[-1], 1), trend("train_loss"), trend("seg_loss"), trend("branch_loss"),
                     trend("unlabeled_branch_loss"), t.get("finite", "-"), t.get("info_nce", {}).get("verdict", "-"),
                     t.get("unlabeled_info_nce", {}).get("verdict", "-")])
    return lines + table(["trainer", "plans", "compiled", "epochs", "last epoch s", "train_loss", "seg_loss",
                          "branch_loss", "unlabeled_branch_loss", "finite", "InfoNCE (labeled)",
                          "InfoNCE (unlabeled)"], rows)


def prediction_markdown(phase: dict) -> list[str]:
    """Phase 4's table."""
    if not phase.get("rows"):
        return []
    lines = ["", "## Prediction time", "", f"{phase['how']}; case {phase['case']}, {phase['warmup']} warm-up + "
             f"{phase['rounds']} timed rounds, median; baseline {phase['baseline']}; noise: (max − min) ÷ median of "
             "the rounds; equal within noise when the ratio is within the larger noise of the two.", ""]
    return lines + table(["checkpoint", "plans", "median s", "× baseline", "noise", "verdict"], [
        [r["trainer"], r["plans"], fmt(r["median_s"], 3), fmt(r["x_baseline"], 3), fmt(r["noise"], 3), r["verdict"]]
        for r in phase["rows"]])


# -- main ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--budget", type=float, default=420,
                        help="seconds for the whole run, shared by the phases (default 420)")
    parser.add_argument("--tiny", action="store_true", help="on CPU: tiny plans, 2 steps, 1 training iteration")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for nnU-Net's data and the command logs (default: a temporary folder, removed "
                             "at the end)")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error(f"--budget must be a positive number of seconds (got {args.budget})")
    return args


def nnunet_ext_environment() -> dict[str, str]:
    """What every command needs besides nnU-Net's folders: this checkout first on the Python path, our trainer
    folder in ``nnUNet_extTrainer`` (what an installed nnunet_ext's startup hook adds), unbuffered output."""
    from nnunet_ext._startup import ENV_VAR, with_search_folder

    return {"PYTHONUNBUFFERED": "1", ENV_VAR: with_search_folder(os.environ.get(ENV_VAR)),
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}


def guarded(phase, *args) -> dict:
    """``phase(*args)``, or its failure as a result: a bug in one phase must not cost the others their time."""
    try:
        return phase(*args)
    except Exception as error:
        traceback.print_exc()
        return {"status": f"failed: {type(error).__name__}: {str(error)[:300]}"}


def run_phases(mode: Mode, budget: Budget, report: Report, folders: Folders) -> int:
    """The environment check, then phases 2, 3 and 4, the dataset preparation running in the background."""
    env = environment(mode)
    problem = environment_problem(env, mode)
    report.phase("environment", {**env, "status": f"failed: {problem}" if problem else "done"})
    if problem:
        log(f"cannot run the check: {problem}")
        return 2
    os.environ.update(nnunet_ext_environment())  # for the commands, and phase 4's trainer lookup in this process
    runner = Runner(folders.work / "logs", dict(os.environ))
    preparation = Preparation(runner, mode, budget.ends["commands"])
    preparation.start()
    try:
        report.phase("steps", guarded(step_benchmarks, mode, budget, report))
        report.phase("commands", guarded(real_commands, mode, budget, runner, preparation, folders))
        trainings = report.data["phases"]["commands"].get("trainings", [])
        report.phase("prediction", guarded(prediction_times, mode, budget, folders, trainings))
    finally:
        runner.kill_all("skipped: the check stopped early")
    statuses = {name: phase["status"] for name, phase in report.data["phases"].items()}
    log(f"done: {statuses}; wrote {report.out / 'gpu_check.json'} and {report.out / 'gpu_check.md'}")
    return 1 if any(s.startswith("failed") for s in statuses.values()) else 0


def main(argv: list[str] | None = None) -> int:
    """Run the check; gpu_check.json and gpu_check.md hold whatever it did, also when it stops early."""
    global START
    START = time.monotonic()  # the budget counts from here (also when main is called in-process)
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    mode = TINY if args.tiny else FULL
    report = Report(args.out, {"command": "python benchmarks/gpu_check.py " + " ".join(argv),
                               "mode": "tiny" if args.tiny else "full", "budget_s": args.budget, "shares": SHARES,
                               "started": datetime.datetime.now().isoformat(timespec="seconds")})
    folders = Folders((args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))).resolve())
    for var, folder in folders.env.items():  # before nnU-Net is imported: it reads them then
        os.makedirs(folder, exist_ok=True)
        os.environ[var] = folder
    try:
        return run_phases(mode, Budget(args.budget), report, folders)
    finally:
        report.write()
        if args.work is None:
            shutil.rmtree(folders.work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
