"""``nnUNetv2_train ... -pretrained_weights FILE`` for nnunet_ext's trainers: load what matches, say what did not.

nnU-Net's own loader asserts that every tensor of the network except the segmentation layers is in the file,
so it refuses an encoder-only checkpoint (e.g. self-supervised pretraining such as nnssl's). For our trainers
(:func:`nnunet_ext.compat.accept_pretrained_weights`) the weights are matched instead:

- an **nnssl checkpoint** (detected by its adaptation plan, :mod:`nnunet_ext.nnssl`) gives its encoder and stem,
  mapped by the plan's keys; a stem pretrained on one channel is repeated over the plan's input channels and
  divided by their number; a planned network that is not the checkpoint's architecture is refused, naming what to
  plan (``nnunet-ext plan --like-pretrained``);
- any other file is an nnU-Net checkpoint (``network_weights``) or a plain state dict (also under ``state_dict`` or
  ``model``), matched by name and shape; ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes are dropped,
  and an encoder saved on its own (keys without the ``encoder.`` prefix) is matched against the network's encoder;
- nnU-Net's segmentation layers (``.seg_layers.``) are never loaded (the label set may differ), as in
  nnU-Net; a regularization branch (not part of ``network_weights``) starts fresh;
- names of one tensor (dynamic_network_architectures registers e.g. the encoder again as ``decoder.encoder``) load
  together and are counted once; in an nnssl checkpoint, the file's ``decoder.encoder.*`` keys are recorded as
  used, naming the encoder key whose tensor they are;
- an nnU-Net checkpoint stays one even with an ``adaptation_plan.json`` beside it; a file that looks like nnssl's but
  has no adaptation plan is matched by name, and the log warns when its stem was not loaded;
- the log lists, per part of the network (encoder, decoder, segmentation layers), how many tensors were
  loaded, then every key loaded, adapted, not loaded and unused; ``pretrained_weights.json`` next to the fold's
  checkpoint records the same for every key of the network and of the file (:func:`write_record`). A file of
  which nothing matches is an error naming it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from nnunet_ext import nnssl
from nnunet_ext.files import file_sha256, json_differences, write_text_atomic

SKIPPED = (".seg_layers.",)
PREFIXES = ("module.", "_orig_mod.")
RECORD_FILE = "pretrained_weights.json"  # beside the fold's checkpoint


def read_checkpoint(filename: str) -> object:
    """What ``torch.load`` reads from ``filename`` (on the CPU); ValueError naming the file when it cannot."""
    try:
        return torch.load(filename, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ValueError(f"-pretrained_weights {filename}: cannot be read by torch.load ({error})") from None


def state_dict_of(saved: object, filename: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint or state dict, without DDP / torch.compile prefixes."""
    for key in ("network_weights", "state_dict", "model"):
        if isinstance(saved, dict) and isinstance(saved.get(key), dict):
            saved = saved[key]
            break
    if not isinstance(saved, dict) or not any(isinstance(v, torch.Tensor) for v in saved.values()):
        raise ValueError(f"-pretrained_weights {filename}: holds no state dict (expected an nnU-Net checkpoint with "
                         f"'network_weights' or a dictionary of tensors)")
    state = {}
    for key, value in saved.items():
        while key.startswith(PREFIXES):  # leading wrappers only: a module named e.g. "submodule" keeps its name
            key = key[len(next(p for p in PREFIXES if key.startswith(p))):]
        state[key] = value
    return state


@dataclass
class Transfer:
    """What a file gives a network: ``values`` by network key, the file key each came from, the keys adapted (and
    how), why the network's other keys and the file's unused keys were not loaded, the file keys that are other
    names of a used key's tensor (``aliases``), warnings for the log (``notes``) and facts for the record."""

    source: str
    kind: str
    file_keys: list[str]
    values: dict[str, torch.Tensor]
    origin: dict[str, str]
    adapted: dict[str, str] = field(default_factory=dict)
    not_loaded: dict[str, str] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def matching_transfer(state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], filename: str) -> Transfer:
    """The tensors of ``state`` that match ``own`` by name and shape (segmentation layers never)."""
    file_keys = list(state)
    if not set(state) & set(own) and {f"encoder.{k}" for k in state} & set(own):
        state = {f"encoder.{k}": v for k, v in state.items()}  # an encoder saved on its own
    rename = dict(zip(state, file_keys))
    loaded = [k for k in own if k in state and not _skipped(k) and state[k].shape == own[k].shape]
    if not loaded:
        raise ValueError(f"-pretrained_weights {filename}: none of its {len(state)} tensors matches the network by "
                         f"name and shape (first of the file: {sorted(state)[:3]}; of the network: "
                         f"{sorted(own)[:3]}); was it trained with the same plans and configuration?")
    not_loaded = {k: "shape differs" if k in state and not _skipped(k) else
                  "segmentation layers are never loaded" if _skipped(k) else "not in the file"
                  for k in own if k not in loaded}
    unused = {rename[k]: "shape differs" if k in own and not _skipped(k) else
              "segmentation layers are never loaded" if _skipped(k) else "not in the network"
              for k in state if k not in loaded}
    return Transfer(filename, "nnU-Net checkpoint or state dict", file_keys, {k: state[k] for k in loaded},
                    {k: rename[k] for k in loaded}, not_loaded=not_loaded, unused=unused)


def nnssl_transfer(module: nn.Module, saved: object, plan: nnssl.AdaptationPlan, filename: str) -> Transfer:
    """The encoder and stem of an nnssl checkpoint for ``module`` (:func:`nnunet_ext.nnssl.map_encoder`)."""
    state, own = state_dict_of(saved, filename), module.state_dict()
    planned = next((m for m in module.modules() if hasattr(m, "key_to_encoder")), None)
    mapped = nnssl.map_encoder(plan, state, own, getattr(planned, "key_to_encoder", "encoder.stages"),
                               getattr(planned, "key_to_stem", "encoder.stem"))
    not_loaded = {k: "segmentation layers are never loaded" if _skipped(k) else
                  "not pretrained: nnssl checkpoints give the encoder and stem, the rest starts from scratch"
                  for k in own if k not in mapped.values}
    citations = saved.get("citations", []) if isinstance(saved, Mapping) else []
    return Transfer(filename, "nnssl checkpoint", list(state), mapped.values, mapped.origin, mapped.adapted,
                    not_loaded, mapped.unused, {"nnssl": {**plan.summary(), "citations": citations}}, mapped.aliases)


def transfer_for(module: nn.Module, filename: str) -> Transfer:
    """What ``filename`` gives ``module``: an nnssl checkpoint's encoder and stem, else what matches by name and
    shape (with a warning where an nnssl-looking file without its adaptation plan leaves the stem out). Nothing is
    loaded; ValueError when nothing can be."""
    saved = read_checkpoint(filename)
    plan = nnssl.adaptation_plan_of(saved, filename)
    if plan is not None:
        return nnssl_transfer(module, saved, plan, filename)
    state, own = state_dict_of(saved, filename), module.state_dict()
    transfer = matching_transfer(state, own, filename)
    beside = nnssl.plan_beside(filename)
    if nnssl.is_nnunet_checkpoint(saved) and os.path.isfile(beside):
        transfer.notes.append(f"{beside} is not used: {filename} is a checkpoint of nnU-Net's trainer "
                              f"{saved.get('trainer_name')} (matched by name and shape), not an nnssl checkpoint")
    elif nnssl.looks_like_nnssl(saved, list(state)):
        planned = next((m for m in module.modules() if hasattr(m, "key_to_stem")), None)
        stem = getattr(planned, "key_to_stem", "encoder.stem") + "."
        missing = [k for k in own if k.startswith(stem) and k not in transfer.values]
        if missing:
            shapes = "; ".join(f"{k}: file {list(state[k].shape)}, network {list(own[k].shape)}"
                               if k in state else f"{k}: not in the file" for k in missing[:2])
            transfer.notes.append(
                f"WARNING: the stem was NOT loaded ({len(missing)} of its tensors start as initialised: {shapes}). "
                f"{filename} looks like an nnssl checkpoint (encoder.stem.* / decoder.encoder.* keys, no nnU-Net "
                f"trainer state) but its adaptation plan is missing (no '{nnssl.ADAPTATION_PLAN_KEY}' in it and no "
                f"{beside}), so it was matched by name and shape only: put the checkpoint's "
                f"{nnssl.ADAPTATION_PLAN_FILE} beside it to load the stem adapted to the plan's input channels")
    return transfer


def planned_network(plans: dict, configuration: str, num_input_channels: int) -> nn.Module:
    """The network nnU-Net builds from ``plans`` for ``configuration``, with shapes only (on the meta device)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans).get_configuration(configuration)
    with torch.device("meta"):
        return get_network_from_plans(manager.network_arch_class_name, manager.network_arch_init_kwargs,
                                      manager.network_arch_init_kwargs_req_import, num_input_channels, 2,
                                      allow_init=False, deep_supervision=True)


def check_fits(filename: str, plans: dict, configuration: str, num_input_channels: int) -> Transfer:
    """What ``filename`` would give the network of ``plans`` (nothing is loaded); ValueError naming what to plan
    when it does not fit (:func:`transfer_for`)."""
    return transfer_for(planned_network(plans, configuration, num_input_channels), filename)


def _skipped(key: str) -> bool:
    return any(s in key for s in SKIPPED)


def _part(key: str) -> str:
    if _skipped(key):
        return "segmentation layers"
    return key.split(".", 1)[0]


def same_tensor_names(module: nn.Module) -> dict[str, str]:
    """Each state-dict key of ``module`` -> the first key of the same tensor (itself when it has no other name)."""
    first: dict[int, str] = {}
    return {key: first.setdefault(id(value), key) for key, value in module.state_dict(keep_vars=True).items()}


def apply_transfer(module: nn.Module, transfer: Transfer, log: Callable[[str], None] = print) -> dict:
    """Load ``transfer`` into ``module`` (every name of a loaded tensor), log it, and return the record: the
    status of every key of the network and of the file (:data:`RECORD_FILE`)."""
    own, canonical = module.state_dict(), same_tensor_names(module)
    by_tensor: dict[str, str] = {}
    for key in transfer.values:
        by_tensor.setdefault(canonical[key], key)
    network = {}
    for key in own:
        source = by_tensor.get(canonical[key])
        if source is not None:
            own[key] = transfer.values[source]
        if key in transfer.values:
            entry = {"status": "adapted" if key in transfer.adapted else "loaded", "from": transfer.origin[key]}
            if key in transfer.adapted:
                entry["how"] = transfer.adapted[key]
        elif source is not None:
            entry = {"status": "adapted" if source in transfer.adapted else "loaded", "from": transfer.origin[source],
                     "loaded_with": source}
        else:
            entry = {"status": "skipped" if _skipped(key) else "not loaded",
                     "why": transfer.not_loaded.get(key, "not in the file")}
        if canonical[key] != key and "loaded_with" not in entry:
            entry["same_tensor_as"] = canonical[key]
        network[key] = entry
    module.load_state_dict(own)
    used: dict[str, list[str]] = {}
    for key, source in transfer.origin.items():
        used.setdefault(source, []).append(key)
    file = {}
    for key in transfer.file_keys:
        if key in used:
            file[key] = {"status": "used", "into": used[key]}
        elif key in transfer.aliases:  # another name of a used tensor, e.g. decoder.encoder.* of encoder.*
            alias = transfer.aliases[key]
            file[key] = {"status": "used", "same_tensor_as": alias, "into": used.get(alias, [])}
        else:
            file[key] = {"status": "unused", "why": transfer.unused.get(key, "not in the network")}
    parts: dict[str, list[int]] = {}
    for key, entry in network.items():
        if canonical[key] == key:  # each tensor once, in the part of its first name
            counts = parts.setdefault(_part(key), [0, 0])
            counts[0] += entry["status"] in ("loaded", "adapted")
            counts[1] += 1
    record = {"source": os.path.abspath(transfer.source), "format": transfer.kind, **transfer.details,
              **({"notes": list(transfer.notes)} if transfer.notes else {}),
              "summary": {part: {"loaded": done, "tensors": total} for part, (done, total) in parts.items()},
              "network": network, "file": file}
    _log_record(record, transfer, log)
    return record


def key_lists(record: dict) -> dict[str, list[str]]:
    """The keys of a record (:func:`apply_transfer`) by status: ``loaded`` (network keys loaded from the file,
    adapted ones included, each tensor under its first loaded name), ``adapted``, ``other_names`` (network keys
    loaded as another name of a loaded tensor), ``shape_differs``, ``not_loaded`` (network keys starting as
    initialised, segmentation layers included), ``unused`` (file keys) and ``aliases`` (file keys that are another
    name of a used tensor)."""
    network, file = record["network"], record["file"]
    return {"loaded": [k for k, e in network.items()
                       if e["status"] in ("loaded", "adapted") and "loaded_with" not in e],
            "adapted": [k for k, e in network.items() if e["status"] == "adapted" and "loaded_with" not in e],
            "other_names": [k for k, e in network.items() if "loaded_with" in e],
            "shape_differs": [k for k, e in network.items() if e.get("why") == "shape differs"],
            "not_loaded": [k for k, e in network.items() if e["status"] in ("not loaded", "skipped")],
            "unused": [k for k, e in file.items() if e["status"] == "unused"],
            "aliases": [k for k, e in file.items() if "same_tensor_as" in e]}


def _log_record(record: dict, transfer: Transfer, log: Callable[[str], None]) -> None:
    """The record in the training log: a summary line, warnings, then the keys of every status."""
    summary = ", ".join(f"{part} {c['loaded']}/{c['tensors']}" for part, c in record["summary"].items())
    done = sum(c["loaded"] for c in record["summary"].values())
    total = sum(c["tensors"] for c in record["summary"].values())
    what = ""
    if "nnssl" in record:
        plan = record["nnssl"]
        what = (f"; nnssl checkpoint of {plan['architecture']} pretrained on {plan['pretrain_num_input_channels']} "
                f"input channel(s), encoder and stem loaded, the rest from scratch")
    log(f"[nnunet-ext] pretrained weights {transfer.source}: loaded {done} of {total} tensors ({summary}){what}")
    for note in transfer.notes:
        log(f"[nnunet-ext] {note}")
    for key, how in transfer.adapted.items():
        log(f"[nnunet-ext] adapted {key}: {how}")
    keys = key_lists(record)
    adapted = set(keys["adapted"])
    lists = (("loaded", [k for k in keys["loaded"] if k not in adapted]),
             ("loaded as another name of a loaded tensor", keys["other_names"]),
             ("not loaded, shape differs", keys["shape_differs"]),
             ("not loaded (start as initialised)", keys["not_loaded"]),
             ("in the file but not used", keys["unused"]))
    for title, listed in lists:
        if listed:
            log(f"[nnunet-ext] {title}: {listed}")
    if keys["aliases"]:
        first = keys["aliases"][0]
        log(f"[nnunet-ext] used as other names of used tensors: {len(keys['aliases'])} keys of the file (e.g. "
            f"{first} = {record['file'][first]['same_tensor_as']}), each in {RECORD_FILE}")
    citations = record.get("nnssl", {}).get("citations")
    if citations:
        log(f"[nnunet-ext] the checkpoint asks to cite {len(citations)} work(s), listed in {RECORD_FILE}")


def write_record(folder: str, record: dict, log: Callable[[str], None] = print) -> str:
    """Write ``record`` to ``folder/pretrained_weights.json`` atomically (a temporary file moved into place); an
    earlier record with other content is kept as ``pretrained_weights.N.json`` (and the log says so), never
    overwritten. Return the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, RECORD_FILE)
    text = json.dumps(record, indent=2)
    if os.path.isfile(path):
        with open(path) as f:
            if f.read() == text:
                return path
        kept = next(p for n in range(1, 10_000)
                    if not os.path.exists(p := os.path.join(folder, f"{RECORD_FILE[:-5]}.{n}.json")))
        os.replace(path, kept)
        log(f"[nnunet-ext] an earlier {RECORD_FILE} of this fold is kept as {kept}")
    write_text_atomic(path, text)
    log(f"[nnunet-ext] every key loaded, adapted, not loaded or unused: {path}")
    return path


def write_twin_plans(plans_file: str, checkpoint: str) -> str:
    """Write the plans of ``plans_file`` again as ``<plans>__pretrained_<sha256[:8] of checkpoint>`` beside it and
    return that identifier, so that trainings starting from the checkpoint get their own nnU-Net result folders
    (``{trainer}__{plans}__{configuration}``) beside the from-scratch ones, on the same preprocessed data (the data
    identifier is kept). An existing twin that differs only in the checkpoint's path (the same bytes, moved) is
    updated, and this says so; one with other plans is refused (FileExistsError naming what differs): folds trained
    under it would otherwise count as trained with plans they were not trained with."""
    digest = file_sha256(checkpoint)
    with open(plans_file) as f:
        plans = json.load(f)
    name = f"{os.path.basename(plans_file).removesuffix('.json')}__pretrained_{digest[:8]}"
    plans.update(plans_name=name, nnunet_ext_pretrained={"checkpoint": os.path.abspath(checkpoint), "sha256": digest})
    path = os.path.join(os.path.dirname(plans_file), f"{name}.json")
    text = json.dumps(plans, indent=4)
    if os.path.isfile(path):
        with open(path) as f:
            old_text = f.read()
        if old_text == text:
            return name
        try:
            old = json.loads(old_text)
        except json.JSONDecodeError:
            old = None
        moved = isinstance(old, dict) and isinstance(old.get("nnunet_ext_pretrained"), dict) and \
            {**old, "nnunet_ext_pretrained": {**old["nnunet_ext_pretrained"], "checkpoint": None}} == \
            {**plans, "nnunet_ext_pretrained": {**plans["nnunet_ext_pretrained"], "checkpoint": None}}
        if not moved:
            differing = ", ".join(json_differences(old, plans)) if old is not None else "not valid JSON"
            raise FileExistsError(
                f"{path}: the plans of the pretrained cells were made from other plans than {plans_file} holds now "
                f"(differing: {differing}); folds trained under {name} used the old ones and would count as "
                f"trained. Restore {os.path.basename(plans_file)} (e.g. plan again with the same options), or, to "
                f"train the pretrained cells again on the new plans, move {path} and the result folders "
                f"*__{name}__* aside")
        print(f"[nnunet-ext] {path}: the checkpoint's path is now {os.path.abspath(checkpoint)} (same sha256)")
    write_text_atomic(path, text)
    return name


def load_pretrained(module: nn.Module, filename: str, log: Callable[[str], None] = print,
                    record_folder: str | None = None) -> dict:
    """Load what ``filename`` gives ``module`` (see the module docstring), log it, write the record into
    ``record_folder`` when given (skipped on DDP ranks other than 0, which load the same), and return it."""
    record = apply_transfer(module, transfer_for(module, filename), log)
    record = {"source": record.pop("source"), "sha256": file_sha256(filename), **record}
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if record_folder is not None and (not distributed or torch.distributed.get_rank() == 0):
        write_record(record_folder, record, log)
    return record


def load_matching(module: nn.Module, filename: str, log: Callable[[str], None] = print) -> dict[str, list[str]]:
    """Load what ``filename`` gives ``module`` (see the module docstring); return the record's key lists
    (:func:`key_lists`: ``loaded``, ``not_loaded``, ``unused`` and the others)."""
    return key_lists(load_pretrained(module, filename, log))
