"""``nnUNetv2_train ... -pretrained_weights FILE`` for nnunet_ext's trainers: load what matches, say what did not.

nnU-Net's own loader asserts that every tensor of the network except the segmentation layers is in the file,
so it refuses an encoder-only checkpoint (e.g. self-supervised pretraining such as nnssl's). For our trainers
(:func:`nnunet_ext.compat.accept_pretrained_weights`) the weights are matched by name and shape instead:

- the file is an nnU-Net checkpoint (``network_weights``) or a plain state dict (also under ``state_dict`` or
  ``model``); ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes are dropped, and an encoder saved
  on its own (keys without the ``encoder.`` prefix) is matched against the network's encoder;
- nnU-Net's segmentation layers (``.seg_layers.``) are never loaded (the label set may differ), as in
  nnU-Net; a regularization branch (not part of ``network_weights``) starts fresh;
- the log lists, per part of the network (encoder, decoder, segmentation layers), how many tensors were
  loaded and which were not, and the file's tensors that were not used; a file of which nothing matches is
  an error naming it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

SKIPPED = (".seg_layers.",)
PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(filename: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint or state-dict file, without DDP / torch.compile prefixes."""
    try:
        saved = torch.load(filename, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ValueError(f"-pretrained_weights {filename}: cannot be read by torch.load ({error})") from None
    for key in ("network_weights", "state_dict", "model"):
        if isinstance(saved, dict) and isinstance(saved.get(key), dict):
            saved = saved[key]
            break
    if not isinstance(saved, dict) or not any(isinstance(v, torch.Tensor) for v in saved.values()):
        raise ValueError(f"-pretrained_weights {filename}: holds no state dict (expected an nnU-Net checkpoint with "
                         f"'network_weights' or a dictionary of tensors)")
    state = {}
    for key, value in saved.items():
        for prefix in PREFIXES:
            key = key.replace(prefix, "")
        state[key] = value
    return state


def _part(key: str) -> str:
    if any(s in key for s in SKIPPED):
        return "segmentation layers"
    return key.split(".", 1)[0]


def load_matching(module: nn.Module, filename: str, log: Callable[[str], None] = print) -> dict[str, list[str]]:
    """Load the tensors of ``filename`` that match ``module``'s by name and shape (see the module docstring);
    return ``{"loaded", "not_loaded", "unused"}`` key lists."""
    state = read_state_dict(filename)
    own = module.state_dict()
    if not set(state) & set(own) and set(f"encoder.{k}" for k in state) & set(own):
        state = {f"encoder.{k}": v for k, v in state.items()}  # an encoder saved on its own
    loaded = [k for k in own if k in state and not any(s in k for s in SKIPPED) and state[k].shape == own[k].shape]
    if not loaded:
        raise ValueError(f"-pretrained_weights {filename}: none of its {len(state)} tensors matches the network by "
                         f"name and shape (first of the file: {sorted(state)[:3]}; of the network: "
                         f"{sorted(own)[:3]}); was it trained with the same plans and configuration?")
    mismatched = [k for k in own if k in state and k not in loaded and not any(s in k for s in SKIPPED)]
    not_loaded = [k for k in own if k not in loaded]
    unused = [k for k in state if k not in own or k in mismatched]
    own.update({k: state[k] for k in loaded})
    module.load_state_dict(own)
    parts = {}
    for key in own:
        done, total = parts.get(_part(key), (0, 0))
        parts[_part(key)] = (done + (key in loaded), total + 1)
    summary = ", ".join(f"{part} {done}/{total}" for part, (done, total) in parts.items())
    log(f"[nnunet-ext] pretrained weights {filename}: loaded {len(loaded)} of {len(own)} tensors ({summary})")
    if mismatched:
        log(f"[nnunet-ext] not loaded, shape differs: {mismatched}")
    if not_loaded:
        log(f"[nnunet-ext] not loaded (start as initialised): {not_loaded}")
    if unused:
        log(f"[nnunet-ext] in the file but not used: {unused}")
    return {"loaded": loaded, "not_loaded": not_loaded, "unused": unused}
