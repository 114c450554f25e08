"""Multi-task base trainer: nnU-Net's planned network plus one regularization branch on its encoder.

Training forward: ``skips = encoder(x)``, ``seg = decoder(skips)``, ``branch_loss = branch(x, skips, target,
encoder)``; total loss = nnU-Net's own segmentation loss (deep supervision, DC+BCE for regions) + the
branch loss. nnU-Net's train_step, validation and prediction run unchanged:

- the branch lives inside :class:`MultiTaskNetwork`, the module nnU-Net compiles, wraps in DDP and
  optimizes (one optimizer, one gradient clip);
- the per-batch branch input (region masks for branches that need them) is handed over through
  :meth:`MultiTaskTrainer.train_step` just before nnU-Net's own train_step runs the forward pass;
- the wrapper's ``state_dict`` is the segmentation network's, so ``network_weights`` in checkpoints
  load strictly into the plain planned network (what ``nnUNetv2_predict`` builds); the branch is saved
  under ``branch_weights`` and restored by ``--c``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn

from nnunet_ext.branches.base import Branch
from nnunet_ext.compat import (
    network_built_by,
    unwrap_network,
)
from nnunet_ext.evaluation.curves import foreground_names
from nnunet_ext.trainers.base import ExtTrainer
from nnunet_ext.trainers.monitor import BranchMonitor, accumulated_grad_norm, grad_norm
from nnunet_ext.trainers.ramps import sigmoid_rampup


@dataclass
class BranchBatch:
    """What the branch needs besides the image: region masks (B, K, *spatial), or None."""

    target: torch.Tensor | None


@dataclass(frozen=True)
class BranchRule:
    """How a trainer weights its branch loss over training: the weight, the share of the steps it ramps up over (0:
    constant from the first step) and the cap on its pull on the encoder (None: no cap). Recorded in checkpoints, so
    that ``--c`` never continues a run under another rule than the one it started with."""

    weight: float
    rampup_fraction: float = 0.0
    pull_cap: float | None = None

    def describe(self) -> str:
        """The rule in words, for logs and errors."""
        text = f"weight {self.weight:g}, " + (f"ramped up over the first {self.rampup_fraction:.0%} of the steps"
                                              if self.rampup_fraction > 0 else "constant from the first step")
        return text + (f", pull on the encoder capped at {self.pull_cap:g}x the segmentation loss's"
                       if self.pull_cap is not None else "")


class BranchRuleMismatchError(ValueError):
    """A checkpoint trained under another branch rule than its trainer's current one: ``--c`` would change the rule
    mid-training, and a study would report it beside folds trained under the current rule."""


@dataclass
class MultiTaskOutput:
    """Training output of :class:`MultiTaskNetwork`: segmentation outputs and the branch loss."""

    seg: torch.Tensor | list[torch.Tensor]
    branch_loss: torch.Tensor


class MultiTaskNetwork(nn.Module):
    """The planned encoder-decoder (``net``) plus a branch; ``forward(x)`` is the plain segmentation.

    In training mode, a :class:`BranchBatch` stored in ``pending`` is consumed by the next forward,
    which then also runs the branch and returns a :class:`MultiTaskOutput`. ``state_dict`` and
    ``load_state_dict`` are the segmentation network's; the branch has ``branch.state_dict()``.
    """

    def __init__(self, net: nn.Module, branch: Branch):
        super().__init__()
        if not (hasattr(net, "encoder") and hasattr(net, "decoder")):
            raise TypeError(f"{type(net).__name__} has no encoder/decoder attributes; regularization branches "
                            "need an encoder-decoder network (PlainConvUNet, ResidualEncoderUNet, ...)")
        self.net = net
        self.branch = branch
        self.pending: BranchBatch | None = None

    @property
    def encoder(self) -> nn.Module:
        """The planned encoder."""
        return self.net.encoder

    @property
    def decoder(self) -> nn.Module:
        """The planned decoder (nnU-Net toggles its deep supervision)."""
        return self.net.decoder

    def forward(self, x: torch.Tensor):
        """Segmentation output; with a pending branch batch in training mode a :class:`MultiTaskOutput`."""
        skips = self.net.encoder(x)
        seg = self.net.decoder(skips)
        pending, self.pending = self.pending, None
        if pending is None or not self.training:
            return seg
        branch_loss = self.branch(x, skips, pending.target, self.net.encoder)
        return MultiTaskOutput(seg, branch_loss)

    def branch_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The branch loss of images without labels: encoder (when the branch needs its skips) and branch;
        the decoder does not run."""
        skips = self.net.encoder(x) if self.branch.needs_skips else None
        return self.branch(x, skips, None, self.net.encoder)

    def state_dict(self, *args, **kwargs):
        """The segmentation network's state dict (loads strictly into the plain planned network)."""
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load segmentation network weights (as saved by :meth:`state_dict`)."""
        return self.net.load_state_dict(state_dict, strict=strict, assign=assign)


class MultiTaskLoss(nn.Module):
    """nnU-Net's segmentation loss plus ``factor`` times the branch loss; plain (validation) outputs pass through.

    ``factor`` multiplies the branch weight at the current step (its ramp and pull cap; 1: the constant weight).
    ``last`` keeps the detached parts of the latest training loss for logging (``branch_loss`` with the branch's
    weight, without the factor). When ``probe`` holds (encoder parameters, loss scale), the next training loss also
    measures the gradient norm each applied part puts on those parameters into ``last_probe``
    (:func:`~nnunet_ext.trainers.monitor.grad_norm`), then clears ``probe``.
    """

    def __init__(self, seg_loss: nn.Module):
        super().__init__()
        self.seg_loss = seg_loss
        self.factor = 1.0
        self.probe: tuple[list[torch.Tensor], float] | None = None
        self.last: dict[str, torch.Tensor] = {}
        self.last_probe: dict[str, float] = {}

    def forward(self, output, target):
        """Total loss of a training output, or nnU-Net's loss of a plain (validation) output."""
        if not isinstance(output, MultiTaskOutput):
            return self.seg_loss(output, target)
        seg = self.seg_loss(output.seg, target)
        branch = self.factor * output.branch_loss
        self.last = {"seg_loss": seg.detach(), "branch_loss": output.branch_loss.detach()}
        self.last_probe = {}
        if self.probe is not None:
            params, scale = self.probe
            self.probe = None
            self.last_probe = {"encoder_grad_segmentation": grad_norm(seg, params, scale),
                               "encoder_grad_branch": grad_norm(branch, params, scale)}
        return seg + branch


class MultiTaskTrainer(ExtTrainer):
    """nnU-Net trainer with one regularization branch; subclasses name ``branch_class`` and its kwargs.

    ``branch_rampup_fraction``: the branch weight ramps up as ``exp(-5 (1 - t)²)`` over that share of all training
    steps (:func:`~nnunet_ext.trainers.ramps.sigmoid_rampup`; 0: the constant weight from the first step, as in
    the paper). ``branch_pull_cap``: the branch's pull on the shared encoder (the gradient norm of its labeled and
    unlabeled losses there, as applied) is held at most this multiple of the segmentation loss's, by scaling the
    branch weight down (:meth:`pull_cap_factor`; None: no cap). ``monitor_probes``: gradient-norm probe steps per
    epoch of the branch monitor (:mod:`nnunet_ext.trainers.monitor`; 0: none; the cap needs them).
    ``branch_rule_of_unrecorded_checkpoints``: the rule of a checkpoint that records none (written before rules were
    recorded), when it differs from the trainer's current rule (a default changed); None: the current rule.
    """

    branch_class: ClassVar[type[Branch]]
    branch_kwargs: ClassVar[dict] = {}
    branch_rampup_fraction: ClassVar[float] = 0.0
    branch_pull_cap: ClassVar[float | None] = None
    monitor_probes: ClassVar[int] = 5
    branch_rule_of_unrecorded_checkpoints: ClassVar[BranchRule | None] = None

    # -- building -----------------------------------------------------------------------------------
    def initialize(self):
        """nnU-Net's initialize, with the training network built as net + branch (inference stays plain), then the
        branch monitor."""
        with network_built_by(self, self._build_training_network):
            super().initialize()
        self.loss = MultiTaskLoss(self.loss)
        self.iteration_in_epoch = 0
        self.pulls: dict[str, float] = {}  # running estimates of the encoder pulls (see pull_cap_factor)
        probes = 0 if self.is_ddp else self.monitor_probes
        self.monitor = BranchMonitor(self.num_iterations_per_epoch, probes)
        rule = (f"ramped up over the first {self.branch_rampup_fraction:.0%} of the "
                f"{self.num_epochs * self.num_iterations_per_epoch} steps" if self.branch_rampup_fraction > 0
                else "constant from the first step")
        if self.branch_pull_cap is not None:
            rule += (f", scaled down wherever the branch would pull on the shared encoder harder than "
                     f"{self.branch_pull_cap:g}x the segmentation loss"
                     + (" (not under DDP: no probes there)" if not probes else ""))
        self.print_to_log_file(f"Branch weight {self.multitask_network.branch.weight:g}, {rule}; branch monitor: "
                               f"{probes} gradient-norm probes per epoch"
                               f"{' (none under DDP)' if self.is_ddp else ''}, written to branch_monitor.json "
                               f"and branch_progress.png")

    def _build_training_network(self, plans_manager, configuration_manager, num_input_channels: int,
                                num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """The planned network (nnU-Net's static builder) wrapped with this trainer's branch."""
        net = type(self).build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                    num_output_channels, enable_deep_supervision)
        kwargs = self.branch_arguments()
        branch = self.branch_class.from_encoder(net.encoder, configuration_manager.patch_size,
                                                num_input_channels, self.num_branch_targets, **kwargs)
        self.print_to_log_file(f"{type(branch).__name__}: {sum(p.numel() for p in branch.parameters())} "
                               f"parameters, arguments {kwargs}")
        if branch.description(configuration_manager.patch_size):
            self.print_to_log_file(f"{type(branch).__name__}: {branch.description(configuration_manager.patch_size)}")
        return MultiTaskNetwork(net, branch)

    def branch_arguments(self) -> dict:
        """Keyword arguments of the branch (hook: derive them from the plans or the device)."""
        return dict(self.branch_kwargs)

    @classmethod
    def rule_with_weight(cls, weight: float) -> BranchRule:
        """This trainer class's :class:`BranchRule` for a branch of ``weight``."""
        cap = None if cls.branch_pull_cap is None else float(cls.branch_pull_cap)
        return BranchRule(float(weight), float(cls.branch_rampup_fraction), cap)

    @property
    def branch_rule(self) -> BranchRule:
        """This trainer's :class:`BranchRule` (its built branch's weight)."""
        return self.rule_with_weight(self.multitask_network.branch.weight)

    @property
    def trained_rule(self) -> BranchRule:
        """The rule the weights were trained with: a resumed checkpoint's (it differs from :attr:`branch_rule` only
        for a finished run, which :meth:`check_resumed_rule` lets through), else this trainer's."""
        resumed = getattr(self, "resumed_rule", None)
        return resumed[0] if resumed is not None else self.branch_rule

    @classmethod
    def rule_of_checkpoint(cls, recorded: dict | None) -> BranchRule | None:
        """The rule a checkpoint of this trainer was trained with: its ``branch_rule`` record, or
        ``branch_rule_of_unrecorded_checkpoints`` (None: this trainer's rule, never changed)."""
        return BranchRule(**recorded) if recorded is not None else cls.branch_rule_of_unrecorded_checkpoints

    @classmethod
    def follows(cls, rule: BranchRule) -> bool:
        """Whether ``rule`` is this trainer class's (the weight compared where ``branch_kwargs`` names one)."""
        return rule == cls.rule_with_weight(cls.branch_kwargs.get("weight", rule.weight))

    @property
    def num_branch_targets(self) -> int:
        """Number of binary masks a labeled sample gives the branch (regions, or foreground labels)."""
        lm = self.label_manager
        return len(lm.foreground_regions) if lm.has_regions else len(lm.foreground_labels)

    @property
    def multitask_network(self) -> MultiTaskNetwork:
        """The :class:`MultiTaskNetwork` inside DDP / torch.compile wrappers."""
        return unwrap_network(self.network, MultiTaskNetwork)

    # -- training -----------------------------------------------------------------------------------
    def branch_weight_factor(self) -> float:
        """What the branch weight is multiplied by at the current step: the ramp
        (:func:`~nnunet_ext.trainers.ramps.sigmoid_rampup` over ``branch_rampup_fraction`` of the training steps, 1
        when it is 0; the step is ``current_epoch * iterations + iteration``, so ``--c`` resumes it exactly) times
        :meth:`pull_cap_factor`."""
        total = self.num_epochs * self.num_iterations_per_epoch
        step = self.current_epoch * self.num_iterations_per_epoch + self.iteration_in_epoch
        return sigmoid_rampup(step, round(self.branch_rampup_fraction * total)) * self.pull_cap_factor()

    def pull_cap_factor(self) -> float:
        """``min(1, cap * segmentation / (branch + branch_unlabeled))`` of the running estimates of the encoder
        gradient norms: the segmentation loss's, and the branch's per unit of factor on the labeled and the unlabeled
        batch (their sum bounds the norm of their sum). The estimates are updated at every probe step
        (:meth:`update_pulls`, an average that halves the weight of older probes), so the factor follows the pulls
        with a lag of a few probes; 1 without a cap or before the first probe."""
        if self.branch_pull_cap is None or "segmentation" not in self.pulls or "branch" not in self.pulls:
            return 1.0
        branch = self.pulls["branch"] + self.pulls.get("branch_unlabeled", 0.0)
        return min(1.0, self.branch_pull_cap * self.pulls["segmentation"] / branch) if branch > 0 else 1.0

    def update_pulls(self, **norms: float) -> None:
        """Fold probe measurements (encoder gradient norms; the branch's per unit of factor) into the estimates."""
        for key, value in norms.items():
            self.pulls[key] = value if key not in self.pulls else 0.5 * self.pulls[key] + 0.5 * value

    def on_train_epoch_start(self):
        """nnU-Net's epoch start; the step count within the epoch restarts."""
        super().on_train_epoch_start()
        self.iteration_in_epoch = 0

    def monitor_probe(self) -> tuple[list[torch.Tensor], float] | None:
        """(encoder parameters, AMP loss scale) when this step probes gradient norms, else None."""
        if not self.monitor.is_probe(self.iteration_in_epoch):
            return None
        scale = float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0
        return [p for p in self.multitask_network.encoder.parameters() if p.requires_grad], scale

    def branch_stats(self, prefix_key: str, weighted_loss: torch.Tensor) -> dict[str, float]:
        """The monitor's values of one branch pass: its unweighted loss under ``prefix_key`` and the branch's own
        statistics (``last_stats``: e.g. CPC's vector norm and chance), suffixed like ``prefix_key``."""
        branch = self.multitask_network.branch
        suffix = prefix_key.removeprefix("branch_loss")
        stats = {prefix_key: float(weighted_loss) / branch.weight if branch.weight else None}
        for key, value in getattr(branch, "last_stats", {}).items():
            stats[key if key == "chance" else key + suffix] = float(value)
        return stats

    def after_unlabeled_backward(self, applied_loss: torch.Tensor) -> None:
        """Monitor the unlabeled branch pass whose backward just ran (right after nnU-Net's ``zero_grad``, so the
        encoder's ``.grad`` holds exactly its gradient): its loss, and on probe steps that gradient's norm."""
        probe = self.monitor_probe()
        norm = accumulated_grad_norm(*probe) if probe is not None else None
        if norm is not None and self.loss.factor > 0:
            self.update_pulls(branch_unlabeled=norm / self.loss.factor)
        weighted = applied_loss / self.loss.factor if self.loss.factor else applied_loss  # without ramp and cap
        self.monitor.add(encoder_grad_branch_unlabeled=norm, **self.branch_stats("branch_loss_unlabeled", weighted))

    def branch_masks(self, target: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Binary masks (B, K, *spatial) from nnU-Net's full-resolution training target."""
        t = target[0] if isinstance(target, (list, tuple)) else target
        lm = self.label_manager
        if lm.has_regions:
            return t[:, :len(lm.foreground_regions)].float()
        return torch.cat([(t == label) for label in lm.foreground_labels], 1).float()

    def branch_batch(self, batch: dict) -> BranchBatch:
        """The branch's view of a training batch: region masks for branches that need them."""
        target = None
        if self.branch_class.needs_target:
            target = self.branch_masks(batch["target"]).to(self.device, non_blocking=True)
        return BranchBatch(target)

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's train_step, with the branch input handed to the network and the branch weight's ramp and the
        monitor's probe to the loss first; the step's values go to the monitor."""
        self.multitask_network.pending = self.branch_batch(batch)
        self.loss.factor = self.branch_weight_factor()
        self.loss.probe = self.monitor_probe()
        try:
            result = super().train_step(batch)
        finally:
            self.multitask_network.pending = None
            self.loss.probe = None
        result.update({k: v.cpu().numpy() for k, v in self.loss.last.items()})
        probe = self.loss.last_probe
        if probe and self.loss.factor > 0:
            self.update_pulls(segmentation=probe["encoder_grad_segmentation"],
                              branch=probe["encoder_grad_branch"] / self.loss.factor)
        self.monitor.add(weight=self.loss.factor * self.multitask_network.branch.weight, **probe,
                         **self.branch_stats("branch_loss", self.loss.last["branch_loss"]))
        self.iteration_in_epoch += 1
        return result

    def on_train_start(self):
        """:meth:`check_resumed_rule` before anything is trained or written, then nnU-Net's (``--val``, which trains
        nothing, never gets here: a folder trained under an earlier rule still validates)."""
        self.check_resumed_rule()
        super().on_train_start()

    def check_resumed_rule(self) -> None:
        """Raise :class:`BranchRuleMismatchError` when the loaded checkpoint was trained under another
        :class:`BranchRule` than this trainer's (``--c`` would change the rule in the middle of training)."""
        resumed = getattr(self, "resumed_rule", None)
        if resumed is None or resumed[0] == self.branch_rule or self.current_epoch >= self.num_epochs:
            return  # a finished run (--c of an interrupted final validation) trains nothing; it keeps its record
        rule, source = resumed
        raise BranchRuleMismatchError(
            f"{source} was trained with branch {rule.describe()}, but {type(self).__name__} now trains with "
            f"{self.branch_rule.describe()} (its default changed; docs/study.md, \"CPC stability\"). Continuing it "
            f"with --c would change the rule in the middle of training. Finish it with the nnunet_ext version that "
            f"started it, or move {os.path.dirname(source)} away to train this fold again under the current rule "
            f"(the paper's constant weight is ssCPCSegConstTrainer).")

    def on_epoch_end(self):
        """The epoch's monitor record (with nnU-Net's pseudo Dice of this epoch) is closed before nnU-Net's epoch end
        saves a checkpoint, and written to the fold folder after it."""
        dice = self.logger.get_value("dice_per_class_or_region", step=None)
        record = self.monitor.end_epoch(self.current_epoch, dice[self.current_epoch]
                                        if len(dice) > self.current_epoch else None)
        self.print_to_log_file(self.monitor.summary(record))
        super().on_epoch_end()
        if self.local_rank == 0:
            names = foreground_names(self.dataset_json)  # nnU-Net's order of the pseudo Dice
            self.monitor.write(self.output_folder, {"trainer": type(self).__name__, "fold": self.fold, "names": names,
                                                    "title": f"{type(self).__name__} fold {self.fold}"})

    # -- checkpoints --------------------------------------------------------------------------------
    def checkpoint_extras(self) -> dict:
        """``branch_weights``, ``branch_class`` and ``branch_rule`` (the optimizer state already covers the branch)."""
        branch = self.multitask_network.branch
        return {"branch_weights": branch.state_dict(), "branch_class": type(branch).__name__,
                "branch_rule": asdict(self.trained_rule),
                "branch_monitor": self.monitor.state_dict(), "branch_pulls": dict(self.pulls)}

    def restore_checkpoint_extras(self, checkpoint: dict, source: str) -> None:
        """The branch weights (an error if they are missing); the rule the checkpoint was trained with is kept for
        :meth:`on_train_start` to compare."""
        if "branch_weights" not in checkpoint:
            raise RuntimeError(f"{source}: checkpoint has no 'branch_weights'; it was not "
                               f"written by a {type(self).__name__} and cannot resume its branch.")
        self.multitask_network.branch.load_state_dict(checkpoint["branch_weights"])
        if "branch_monitor" in checkpoint:  # absent in checkpoints of earlier versions: the curves start anew
            self.monitor.load_state_dict(checkpoint["branch_monitor"])
        self.pulls = dict(checkpoint.get("branch_pulls", {}))
        rule = self.rule_of_checkpoint(checkpoint.get("branch_rule"))
        self.resumed_rule = (rule, source) if rule is not None else None
