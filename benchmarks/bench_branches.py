"""Cost of the regularization branches: training-step time, FLOPs, peak memory and prediction time per trainer.

Every trainer runs on the same planned network, batch and device, built in-process from nnU-Net's own
pieces (no ``nnUNetv2_train``): the network from a plans-style architecture through nnU-Net's
``get_network_from_plans``, the region loss as ``nnUNetTrainer._build_loss`` makes it (DC_and_BCE_loss in a
DeepSupervisionWrapper), SGD as ``nnUNetTrainer.configure_optimizers``, and a training step as
``nnUNetTrainer.train_step`` (autocast + GradScaler on CUDA, gradient clipping at 12). Branch trainers wrap
the network in :class:`MultiTaskNetwork` with their ``branch_class(**branch_kwargs)`` and the loss in
:class:`MultiTaskLoss`, and hand the branch its :class:`BranchBatch` before each step, as
``MultiTaskTrainer.train_step`` does. Semi-supervised trainers (ss*) add an unlabeled batch of the same size:
its branch loss runs forward and backward right after ``zero_grad``, then the labeled step follows, as
``SemiSupervisedMixin.train_step`` does; their ``ss ratio`` is the ss step time over (their supervised twin's
step + a branch-only step on the unlabeled batch), i.e. what accumulating the two passes costs beyond doing
them. Prediction is one forward pass over one patch of the plain planned
network (deep supervision off, eval mode, weights loaded strictly from the trained network's
``state_dict``): nnUNetv2_predict never builds the branch, so its ratio to the baseline should be 1.00.

Each trainer is measured in a fresh process (the script re-invokes itself with ``--only TRAINER``), so that
peak memory belongs to that trainer alone: on CUDA ``torch.cuda.max_memory_allocated`` over the training
steps; on CPU the process's ``ru_maxrss`` minus its value just before the network was built (the
interpreter and libraries), since ``ru_maxrss`` is process-wide and never decreases.

    python benchmarks/bench_branches.py --plan cpu-tiny --device cpu
    python benchmarks/bench_branches.py --plan default-128 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nnunet_ext.branches.cpc import default_chunk_size
from nnunet_ext.planners.groupnorm import GROUP_NORM
from nnunet_ext.trainers.boundary import BoundSegTrainer
from nnunet_ext.trainers.cpc import CPCSegTrainer, ssCPCSegTrainer
from nnunet_ext.trainers.encdec import EncDecTrainer
from nnunet_ext.trainers.meanteacher import (
    MeanTeacherTrainer,
    centre_crop,
    consistency_loss,
    ema_update,
    full_resolution,
    perturb,
    plan_unlabeled_crops,
)
from nnunet_ext.trainers.multitask import BranchBatch, MultiTaskLoss, MultiTaskNetwork, MultiTaskTrainer
from nnunet_ext.trainers.semisupervised import SemiSupervisedMixin
from nnunet_ext.trainers.vae import VAESegTrainer, ssVAESegTrainer


class MeanTeacherTrainerFullCrop(MeanTeacherTrainer):
    """MeanTeacherTrainer with its unlabeled consistency on the whole crop (the cost before the centre crop)."""

    unlabeled_voxel_fraction = 1.0


RESULTS = Path(__file__).resolve().parent / "results"
RESULT_PREFIX = "bench_branches result: "
BASELINE = "nnUNetTrainer"
TRAINERS: dict[str, type[nnUNetTrainer]] = {cls.__name__: cls for cls in (
    nnUNetTrainer, EncDecTrainer, VAESegTrainer, BoundSegTrainer, CPCSegTrainer, ssVAESegTrainer, ssCPCSegTrainer,
    MeanTeacherTrainer, MeanTeacherTrainerFullCrop)}
INPUT_CHANNELS = 4  # BraTS / MSD Task01 and the demo dataset: FLAIR, T1w, T1gd, T2w
REGIONS = 3  # whole tumour, tumour core, enhancing tumour


@dataclass(frozen=True)
class PlanSpec:
    """A 3d_fullres plan as nnU-Net's planners derive it for a patch of edge ``patch_edge`` (or of that shape, for a
    tuple; spacing 1, 4-voxel bottleneck)."""

    patch_edge: int | tuple[int, int, int]
    base_features: int
    max_features: int
    batch_size: int = 2


PLANS = {
    # nnunet_ext's nnUNetPlannerCPUGN for a 64^3 patch: 5 stages, features 8..64
    "cpu-tiny": PlanSpec(patch_edge=64, base_features=8, max_features=64),
    # nnU-Net's default planner for a 128^3 patch: 6 stages, features 32..320
    "default-128": PlanSpec(patch_edge=128, base_features=32, max_features=320),
}


@dataclass(frozen=True)
class Architecture:
    """The plans' ``architecture`` entry plus patch size, batch size and deep-supervision scales."""

    network_class_name: str
    arch_kwargs: dict
    kw_requires_import: tuple[str, ...]
    patch_size: tuple[int, ...]
    batch_size: int
    deep_supervision_scales: list[list[float]]

    def build(self, deep_supervision: bool) -> nn.Module:
        """The planned network, as nnU-Net builds it for training (deep supervision) or prediction."""
        return get_network_from_plans(self.network_class_name, self.arch_kwargs, self.kw_requires_import,
                                      INPUT_CHANNELS, REGIONS, allow_init=True, deep_supervision=deep_supervision)


def planned_architecture(spec: PlanSpec, residual: bool) -> Architecture:
    """The architecture nnU-Net's planner (or its ResEnc planner with ``residual``) plans for ``spec``, with
    GroupNorm; topology from nnU-Net's ``get_pool_and_conv_props``."""
    patch = list(spec.patch_edge) if isinstance(spec.patch_edge, tuple) else [spec.patch_edge] * 3
    _, strides, kernels, patch_size, _ = get_pool_and_conv_props([1.0] * 3, patch, 4, 999999)
    n_stages = len(strides)
    kwargs: dict = {
        "n_stages": n_stages,
        "features_per_stage": [min(spec.max_features, spec.base_features * 2 ** i) for i in range(n_stages)],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [list(k) for k in kernels],
        "strides": [list(s) for s in strides],
        "conv_bias": True,
        "norm_op": GROUP_NORM,
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    if residual:  # nnUNetPlannerResEncM's blocks
        name = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
        kwargs["n_blocks_per_stage"] = [1, 3, 4, 6, 6, 6, 6][:n_stages]
        kwargs["n_conv_per_stage_decoder"] = [1] * (n_stages - 1)
    else:
        name = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
        kwargs["n_conv_per_stage"] = [2] * n_stages
        kwargs["n_conv_per_stage_decoder"] = [2] * (n_stages - 1)
    # nnUNetTrainer._get_deep_supervision_scales
    scales = [list(s) for s in 1 / np.cumprod(np.vstack(strides), axis=0)][:-1]
    return Architecture(name, kwargs, ("conv_op", "norm_op", "dropout_op", "nonlin"),
                        tuple(int(s) for s in patch_size), spec.batch_size, scales)


def segmentation_loss(arch: Architecture) -> nn.Module:
    """nnU-Net's region loss with deep supervision, as ``nnUNetTrainer._build_loss`` builds it (no DDP)."""
    loss = DC_and_BCE_loss({}, {"batch_dice": False, "do_bg": True, "smooth": 1e-5, "ddp": False},
                           use_ignore_label=False, dice_class=MemoryEfficientSoftDiceLoss)
    weights = np.array([1 / (2 ** i) for i in range(len(arch.deep_supervision_scales))])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def random_batch(arch: Architecture, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Random input (B, 4, *patch) and blob-like binary region targets at every deep-supervision scale
    (nearest-exact downsampling, as nnU-Net's DownsampleSegForDSTransform)."""
    batch, patch = arch.batch_size, arch.patch_size
    data = torch.randn(batch, INPUT_CHANNELS, *patch, device=device)
    coarse = torch.rand(batch, REGIONS, *(max(1, s // 8) for s in patch), device=device)
    full = F.interpolate(coarse, size=patch, mode="trilinear") > 0.5
    target = [F.interpolate(full.float(), size=[round(s * f) for s, f in zip(patch, scale)],
                            mode="nearest-exact").bool() for scale in arch.deep_supervision_scales]
    return data, target


@dataclass
class TrainingSetup:
    """Network, loss, optimizer and batch of one trainer, ready for nnU-Net training steps."""

    network: nn.Module
    loss: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    data: torch.Tensor
    target: list[torch.Tensor]
    branch_batch: BranchBatch | None
    unlabeled: torch.Tensor | None = None

    def step(self) -> float:
        """One training step as ``nnUNetTrainer.train_step`` (with ``MultiTaskTrainer``'s hand-over and, for ss
        trainers, ``SemiSupervisedMixin``'s unlabeled pass after zero_grad); the labeled loss."""
        if self.branch_batch is not None:
            self.network.pending = self.branch_batch
        self.optimizer.zero_grad(set_to_none=True)
        if self.unlabeled is not None:
            self.backward(self.unlabeled_loss())
        with autocast(self.data.device):
            loss = self.loss(self.network(self.data), self.target)
        self.backward(loss)
        self.clip_and_step()
        return float(loss.detach().cpu())

    def branch_only_step(self) -> float:
        """A step with the unlabeled pass alone (zero_grad, branch loss forward and backward, clip, step)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.unlabeled_loss()
        self.backward(loss)
        self.clip_and_step()
        return float(loss.detach().cpu())

    def unlabeled_loss(self) -> torch.Tensor:
        """The branch loss of the unlabeled batch (``MultiTaskNetwork.branch_loss``)."""
        with autocast(self.unlabeled.device):
            return self.network.branch_loss(self.unlabeled)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward, scaled on CUDA."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def clip_and_step(self) -> None:
        """nnU-Net's (unscale), clip at 12, optimizer step."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()


@dataclass
class MeanTeacherSetup(TrainingSetup):
    """``MeanTeacherTrainer``'s step: the teacher's prediction of the perturbed labeled batch, the unlabeled
    consistency pass on the centre crops after zero_grad (student and teacher on their own perturbations),
    nnU-Net's labeled step with the consistency added (full weight: the ramp changes no cost), then the EMA
    update."""

    teacher: nn.Module | None = None
    unlabeled_crop: tuple[int, ...] = ()

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(x.device):
            return full_resolution(self.teacher(perturb(x, MeanTeacherTrainer.intensity_scale,
                                                        MeanTeacherTrainer.noise_std))).float()

    def step(self) -> float:
        teacher = self.teacher_logits(self.data)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(self.unlabeled_loss())
        with autocast(self.data.device):
            output = self.network(self.data)
            loss = self.loss(output, self.target) + consistency_loss(full_resolution(output), teacher, True)
        self.backward(loss)
        self.clip_and_step()
        ema_update(self.teacher, self.network, MeanTeacherTrainer.ema_decay)
        return float(loss.detach().cpu())

    def unlabeled_loss(self) -> torch.Tensor:
        unlabeled = centre_crop(self.unlabeled, self.unlabeled_crop)
        teacher = self.teacher_logits(unlabeled)
        student_input = perturb(unlabeled, MeanTeacherTrainer.intensity_scale, MeanTeacherTrainer.noise_std)
        with autocast(self.unlabeled.device):
            return consistency_loss(full_resolution(self.network(student_input)), teacher, True)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """nnU-Net's mixed precision: autocast on CUDA only."""
    return torch.autocast(device.type) if device.type == "cuda" else contextlib.nullcontext()


def training_setup(trainer: type[nnUNetTrainer], arch: Architecture, device: torch.device,
                   cpc_chunk: int | None) -> TrainingSetup:
    """The pieces ``trainer`` trains with: the planned network (plus its branch) on ``device``, nnU-Net's
    loss (in MultiTaskLoss for branch trainers), SGD, a GradScaler on CUDA, and a random batch."""
    network = arch.build(deep_supervision=True)
    loss = segmentation_loss(arch)
    data, target = random_batch(arch, device)
    branch_batch = None
    if issubclass(trainer, MultiTaskTrainer):
        kwargs = dict(trainer.branch_kwargs)
        if issubclass(trainer, CPCSegTrainer):  # as CPCSegTrainer.branch_arguments, unless --cpc-chunk says
            kwargs["chunk_size"] = cpc_chunk if cpc_chunk is not None else \
                default_chunk_size(device, arch.patch_size, arch.batch_size)
        branch = trainer.branch_class.from_encoder(network.encoder, arch.patch_size, INPUT_CHANNELS, REGIONS,
                                                   **kwargs)
        network, loss = MultiTaskNetwork(network, branch), MultiTaskLoss(loss)
        # MultiTaskTrainer.branch_batch: all samples labeled; region masks from the full-resolution target
        masks = target[0].float() if trainer.branch_class.needs_target else None
        branch_batch = BranchBatch(masks)
    unlabeled = random_batch(arch, device)[0] if issubclass(trainer, SemiSupervisedMixin) else None
    network = network.to(device)
    optimizer = torch.optim.SGD(network.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    if issubclass(trainer, MeanTeacherTrainer):
        teacher = copy.deepcopy(network).eval().requires_grad_(False)
        teacher.decoder.deep_supervision = False
        crop, crops = plan_unlabeled_crops(arch.patch_size, network.encoder, arch.batch_size,
                                           trainer.unlabeled_voxel_fraction)
        return MeanTeacherSetup(network, loss, optimizer, scaler, data, target, None, unlabeled[:crops], teacher,
                                crop)
    return TrainingSetup(network, loss, optimizer, scaler, data, target, branch_batch, unlabeled)


def prediction_network(setup: TrainingSetup, arch: Architecture, device: torch.device) -> nn.Module:
    """The plain planned network nnUNetv2_predict builds, with the trained weights loaded strictly."""
    network = arch.build(deep_supervision=False)
    network.load_state_dict(setup.network.state_dict())
    return network.to(device).eval()


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return times


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_rss_mb() -> float:
    """Peak resident memory of this process so far in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def progress(message: str) -> Iterator[None]:
    """Print ``message``, run the block, print how long it took (on stderr, which the parent passes on)."""
    print(f"[bench_branches] {message} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"[bench_branches] {message}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def measure(trainer_name: str, args: argparse.Namespace) -> dict:
    """Time, count FLOPs of and measure memory of one trainer's training step and prediction, in this process."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net's run_training
        torch.cuda.reset_peak_memory_stats(device)
    floor_mb = max_rss_mb()
    arch = planned_architecture(PLANS[args.plan], args.residual)
    setup = training_setup(TRAINERS[trainer_name], arch, device, args.cpc_chunk)
    with progress(f"{trainer_name}: {args.warmup} warm-up + {args.repeats} training steps"):
        step_ms = timed(setup.step, device, args.warmup, args.repeats)
    if device.type == "cuda":
        peak = {"peak_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20,
                "reserved_mb": torch.cuda.max_memory_reserved(device) / 2 ** 20}
    else:
        process_peak = max_rss_mb()
        peak = {"peak_mb": process_peak - floor_mb, "process_peak_mb": process_peak, "floor_mb": floor_mb}
    extra = {}
    if setup.unlabeled is not None:
        with progress(f"{trainer_name}: {args.warmup} warm-up + {args.repeats} branch-only steps"):
            extra["branch_only_ms"] = statistics.median(timed(setup.branch_only_step, device, args.warmup,
                                                              args.repeats))
    with progress(f"{trainer_name}: FLOPs of one training step"), FlopCounterMode(display=False) as flops:
        final_loss = setup.step()
    predictor = prediction_network(setup, arch, device)
    patch = setup.data[:1]

    def predict() -> None:
        with torch.inference_mode(), autocast(device):
            predictor(patch)

    with progress(f"{trainer_name}: {args.warmup} warm-up + {args.repeats} predictions"):
        predict_ms = timed(predict, device, args.warmup, args.repeats)
    return {"trainer": trainer_name, "step_ms": statistics.median(step_ms), "step_ms_all": step_ms,
            "gflop_per_step": flops.get_total_flops() / 1e9, **peak, "predict_ms": statistics.median(predict_ms),
            "predict_ms_all": predict_ms, "final_loss": final_loss,
            "parameters": sum(p.numel() for p in setup.network.parameters()), **extra}


def child_command(trainer_name: str, argv: list[str]) -> list[str]:
    """This script's command line for measuring ``trainer_name`` alone."""
    return [sys.executable, str(Path(__file__).resolve()), *argv, "--only", trainer_name]


def run_child(trainer_name: str, argv: list[str]) -> dict:
    """Measure one trainer in a fresh process; its result, or ``{"trainer", "error"}`` when it failed."""
    proc = subprocess.run(child_command(trainer_name, argv), stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        return {"trainer": trainer_name, "error": f"exit code {proc.returncode} (traceback above)"}
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def ratio(value: float, base: float | None) -> str:
    """``value / base`` as '1.23x', or '-' without a baseline."""
    return f"{value / base:.2f}x" if base else "-"


def twin(trainer_name: str) -> str | None:
    """The supervised twin of a semi-supervised trainer (ssCPCSegTrainer -> CPCSegTrainer), else None."""
    ss = issubclass(TRAINERS[trainer_name], SemiSupervisedMixin) and trainer_name.startswith("ss")
    return trainer_name[2:] if ss else None


def ss_ratio(result: dict, by_name: dict[str, dict]) -> str:
    """ss step ÷ (supervised twin's step + branch-only step on the unlabeled batch), or '-'."""
    other = by_name.get(twin(result["trainer"]) or "", {})
    if "branch_only_ms" not in result or "step_ms" not in other:
        return "-"
    return ratio(result["step_ms"], other["step_ms"] + result["branch_only_ms"])


def markdown_table(results: list[dict]) -> str:
    """Markdown table of the results, ratios to the nnUNetTrainer row (ss ratio: see the module docstring)."""
    by_name = {r["trainer"]: r for r in results if "error" not in r}
    base = by_name.get(BASELINE, {})
    rows = ["| trainer | step ms (median) | ×baseline | ss ratio | GFLOP/step | ×baseline | peak MB | ×baseline "
            "| predict ms | ×baseline |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['trainer']} | failed: {r['error']} |" + " |" * 8)
            continue
        rows.append(f"| {r['trainer']} | {r['step_ms']:.1f} | {ratio(r['step_ms'], base.get('step_ms'))} "
                    f"| {ss_ratio(r, by_name)} "
                    f"| {r['gflop_per_step']:.1f} | {ratio(r['gflop_per_step'], base.get('gflop_per_step'))} "
                    f"| {r['peak_mb']:.0f} | {ratio(r['peak_mb'], base.get('peak_mb'))} "
                    f"| {r['predict_ms']:.1f} | {ratio(r['predict_ms'], base.get('predict_ms'))} |")
    return "\n".join(rows)


def environment(args: argparse.Namespace) -> dict:
    """What the numbers depend on besides the trainer: plan, device, library versions, threads."""
    arch = planned_architecture(PLANS[args.plan], args.residual)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    return {"plan": args.plan, "residual": args.residual, "network": arch.network_class_name.rsplit(".", 1)[1],
            "features_per_stage": arch.arch_kwargs["features_per_stage"], "patch_size": list(arch.patch_size),
            "batch_size": arch.batch_size, "input_channels": INPUT_CHANNELS, "regions": REGIONS,
            "device": args.device, "device_name": device_name, "torch_threads": torch.get_num_threads(),
            "cpc_chunk": args.cpc_chunk, "warmup": args.warmup, "repeats": args.repeats,
            "torch": torch.__version__, "python": platform.python_version(),
            "memory": ("torch.cuda.max_memory_allocated over the training steps" if args.device == "cuda" else
                       "ru_maxrss of a fresh process per trainer minus its value before the network was built")}


def default_out(args: argparse.Namespace) -> Path:
    """results/branches_<plan>[_resenc][_cpcchunk<N>]_<device>.json next to this script."""
    parts = [args.plan] + (["resenc"] if args.residual else [])
    parts += [f"cpcchunk{args.cpc_chunk}"] if args.cpc_chunk else []
    return RESULTS / f"branches_{'_'.join(parts)}_{args.device}.json"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line arguments; errors name the argument at fault."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", choices=sorted(PLANS), default="cpu-tiny",
                        help="cpu-tiny: nnUNetPlannerCPUGN at 64^3; default-128: nnU-Net's default plan at 128^3")
    parser.add_argument("--residual", action="store_true",
                        help="ResidualEncoderUNet with nnUNetPlannerResEncM's blocks (same features)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--trainers", nargs="+", choices=sorted(TRAINERS), default=list(TRAINERS),
                        help=f"trainers to measure ({BASELINE}, the baseline, and the supervised twin of an "
                             "ss* trainer are always added)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps and predictions (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps and predictions first (default 3)")
    parser.add_argument("--cpc-chunk", type=int, default=None,
                        help="CPCBranch chunk_size: sub-patches per encoder call, with activation checkpointing")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: results/branches_<plan>"
                        "[_resenc][_cpcchunk<N>]_<device>.json next to this script)")
    parser.add_argument("--only", choices=sorted(TRAINERS), default=None,
                        help="measure this one trainer in this process and print its JSON (used internally)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"--repeats must be >= 1 and --warmup >= 0 (got {args.repeats}, {args.warmup})")
    if args.cpc_chunk is not None and args.cpc_chunk < 1:
        parser.error(f"--cpc-chunk must be a positive number of sub-patches (got {args.cpc_chunk})")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; use --device cpu or run on a GPU machine")
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure every requested trainer in its own process, print the table, write the JSON."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.only:
        print(RESULT_PREFIX + json.dumps(measure(args.only, args)), flush=True)
        return 0
    wanted = [*args.trainers, *(twin(t) for t in args.trainers if twin(t))]  # an ss ratio needs the twin
    trainers = [BASELINE] + [t for t in dict.fromkeys(wanted) if t != BASELINE]
    env = environment(args)
    print(f"[bench_branches] {env['network']} {env['features_per_stage']}, patch {env['patch_size']}, "
          f"batch {env['batch_size']}, {args.device} ({env['device_name']}, {env['torch_threads']} threads)",
          flush=True)
    results = []
    for i, name in enumerate(trainers, 1):
        print(f"[bench_branches] {name} ({i}/{len(trainers)}) in a fresh process", flush=True)
        results.append(run_child(name, argv))
    out = args.out or default_out(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "results": results}, indent=2) + "\n")
    print()
    print(markdown_table(results))
    if args.device == "cpu":
        floors = [r["floor_mb"] for r in results if "floor_mb" in r]
        if floors:
            print(f"\npeak MB on CPU: ru_maxrss above the process's {min(floors):.0f}-{max(floors):.0f} MB "
                  f"before the network was built")
    print(f"\n[bench_branches] wrote {out}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
