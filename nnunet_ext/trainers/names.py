"""Trainer-name grammar: ``<Base>[_<N>labels][_<M>unlabeled][_<E>epochs][_<K>iters][_noMirroring][_s<S>]``.

Every valid name is a class built on demand (module ``__getattr__``, which nnU-Net's trainer search
consults through ``hasattr``), so each variant gets its own ``{trainer}__{plans}__{configuration}``
result folder. Suffixes must appear in the order above, each at most once.

- ``_<N>labels``: train on the first N cases of the fold's deterministic labeled ordering (nested).
- ``_<M>unlabeled``: semi-supervised trainers only; use a nested subset of M unlabeled images.
- ``_<E>epochs``: number of epochs (nnU-Net default 1000).
- ``_<K>iters``: K training iterations per epoch and max(1, K // 5) validation iterations
  (nnU-Net default 250 / 50). For smoke tests and the CPU demo.
- ``_noMirroring``: no mirroring, neither as augmentation nor at test time (nnU-Net's
  ``nnUNetTrainerNoMirroring`` behaviour); makes CPU validation and prediction 8x cheaper in 3D.
- ``_s<S>``: repeat S (S >= 0): seeds Python, NumPy and torch (and the augmentation workers) with S and
  takes the S-th labeled (and unlabeled) subset; ``_s0`` has the same subsets as no suffix. Under DDP, rank r
  adds r * 10**6 to every data seed (so GPUs draw different crops; rank 0 keeps the single-GPU seeds).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

GRAMMAR = "<Base>[_<N>labels][_<M>unlabeled][_<E>epochs][_<K>iters][_noMirroring][_s<S>]"

# base trainer name -> (module, semi-supervised?): every trainer family of nnunet_ext, in one place.
BASES: dict[str, tuple[str, bool]] = {
    "EncDecTrainer": ("nnunet_ext.trainers.encdec", False),
    "VAESegTrainer": ("nnunet_ext.trainers.vae", False),
    "BoundSegTrainer": ("nnunet_ext.trainers.boundary", False),
    "CPCSegTrainer": ("nnunet_ext.trainers.cpc", False),
    "ssVAESegTrainer": ("nnunet_ext.trainers.vae", True),
    "ssCPCSegTrainer": ("nnunet_ext.trainers.cpc", True),
    "ssCPCSegConstTrainer": ("nnunet_ext.trainers.cpc", True),
    "CPCSegCapTrainer": ("nnunet_ext.trainers.cpc", False),
    "ssCPCSegCapTrainer": ("nnunet_ext.trainers.cpc", True),
    "CPCSegZeroTrainer": ("nnunet_ext.trainers.cpc", False),
    "ssCPCSegZeroTrainer": ("nnunet_ext.trainers.cpc", True),
    "MeanTeacherTrainer": ("nnunet_ext.trainers.meanteacher", True),
    "PseudoLabelTrainer": ("nnunet_ext.trainers.pseudolabel", True),
}

# the six models of the paper's Table 1, by their short names (the demo's and the cpu-smoke preset's default)
PAPER_MODELS = ("EncDec", "VAESeg", "BoundSeg", "CPCSeg", "ssVAESeg", "ssCPCSeg")


def is_semi_supervised(model: str) -> bool:
    """Whether a trainer base (``ssCPCSeg`` or ``ssCPCSegTrainer``) learns from unlabeled images; raise KeyError
    for an unknown one."""
    return BASES[model if model.endswith("Trainer") else model + "Trainer"][1]

_SUFFIXES = (
    ("labels", re.compile(r"^(\d+)labels$")),
    ("unlabeled", re.compile(r"^(\d+)unlabeled$")),
    ("epochs", re.compile(r"^(\d+)epochs$")),
    ("iters", re.compile(r"^(\d+)iters$")),
    ("noMirroring", re.compile(r"^noMirroring$")),
    ("seed", re.compile(r"^s(\d+)$")),
)


@dataclass(frozen=True)
class TrainerSpec:
    """What a trainer name asks for; ``None`` means nnU-Net's default."""

    base: str
    labels: int | None = None
    unlabeled: int | None = None
    epochs: int | None = None
    iters: int | None = None
    mirroring: bool = True
    seed: int | None = None


    @property
    def name(self) -> str:
        """The trainer name of this spec (the inverse of :func:`parse_trainer_name`)."""
        name = self.base
        for value, suffix in ((self.labels, "labels"), (self.unlabeled, "unlabeled"), (self.epochs, "epochs"),
                              (self.iters, "iters")):
            if value is not None:
                name += f"_{value}{suffix}"
        name += "" if self.mirroring else "_noMirroring"
        return name if self.seed is None else f"{name}_s{self.seed}"


def trainer_name(base: str, labels: int | None = None, unlabeled: int | None = None, epochs: int | None = None,
                 iters: int | None = None, mirroring: bool = True, seed: int | None = None) -> str:
    """Compose and check a trainer name, e.g. ('EncDec', 6) -> 'EncDecTrainer_6labels' (base with or without
    'Trainer'); raise TrainerNameError for an invalid combination."""
    spec = TrainerSpec(base if base.endswith("Trainer") else base + "Trainer", labels, unlabeled, epochs, iters,
                       mirroring, seed)
    parse_trainer_name(spec.name)
    return spec.name


class TrainerNameError(ValueError):
    """A trainer name that starts with one of our bases but does not follow the grammar."""


def _base_of(name: str) -> str | None:
    """Return the base a name starts with (longest match), or None when it is not ours."""
    matches = [b for b in BASES if name == b or name.startswith(b + "_")]
    return max(matches, key=len) if matches else None


def _match_suffix(token: str) -> tuple[int, str, re.Match] | None:
    """(position in the grammar, key, match) of a suffix token, or None when it is no suffix."""
    for index, (key, pattern) in enumerate(_SUFFIXES):
        match = pattern.match(token)
        if match:
            return index, key, match
    return None


def parse_trainer_name(name: str) -> TrainerSpec:
    """Parse a trainer name; raise TrainerNameError (saying what is wrong) for a malformed one."""
    base = _base_of(name)
    if base is None:
        raise TrainerNameError(f"'{name}' does not start with one of our trainers {sorted(BASES)}.")
    tokens = name[len(base) + 1:].split("_") if name != base else []
    values: dict[str, int | bool] = {}
    position = 0
    for token in tokens:
        found = _match_suffix(token)
        if found is None:
            raise TrainerNameError(
                f"Trainer name '{name}': unknown suffix '_{token}'. Grammar: {GRAMMAR}, "
                f"e.g. {base}_6labels_300epochs.")
        index, key, match = found
        if index < position or key in values:
            raise TrainerNameError(
                f"Trainer name '{name}': suffix '_{token}' is repeated or out of order. Grammar: {GRAMMAR}.")
        position = index
        if key == "noMirroring":
            values[key] = True
            continue
        number = int(match.group(1))
        if key == "seed":
            if match.group(1) != str(number):
                raise TrainerNameError(f"Trainer name '{name}': '_{token}' must be _s followed by a number without "
                                       f"leading zeros (e.g. _s0, _s1).")
            values[key] = number
            continue
        if number < 1 or token.startswith("0"):
            raise TrainerNameError(f"Trainer name '{name}': '_{token}' must be a positive integer without "
                                   f"leading zeros (e.g. _6{key}).")
        values[key] = number
    semi_supervised = BASES[base][1]
    if "unlabeled" in values and not semi_supervised:
        ss = sorted(b for b, (_, ss) in BASES.items() if ss)
        raise TrainerNameError(
            f"Trainer name '{name}': '_unlabeled' needs a semi-supervised trainer "
            f"({', '.join(ss) if ss else 'ss* trainers'}); {base} does not train on unlabeled images.")
    return TrainerSpec(base=base, labels=values.get("labels"), unlabeled=values.get("unlabeled"),
                       epochs=values.get("epochs"), iters=values.get("iters"),
                       mirroring="noMirroring" not in values, seed=values.get("seed"))


_CLASSES: dict[str, type] = {}


def trainer_class(name: str) -> type:
    """Return the trainer class for ``name``, generating and caching suffixed variants."""
    if name in _CLASSES:
        return _CLASSES[name]
    spec = parse_trainer_name(name)
    base_cls = getattr(importlib.import_module(BASES[spec.base][0]), spec.base)
    if name == spec.base:
        return base_cls
    cls = type(name, (base_cls,), {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"{spec.base} with {spec} (generated from its name).",
        "trainer_spec": spec,
    })
    _CLASSES[name] = cls
    return cls


def __getattr__(name: str) -> type:
    """PEP 562 hook: resolve generated trainer names (also makes them picklable by reference)."""
    if _base_of(name) is None:
        raise AttributeError(name)
    return trainer_class(name)
