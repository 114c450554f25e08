"""``-pretrained_weights`` for our trainers: what matches loads, the rest is listed, an encoder alone loads, a file
of which nothing matches is refused by name; end to end from another of our trainers' checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import run
from test_multitask import make_net

from nnunet_ext.files import atomic_text, json_differences, write_json_atomic, write_text_atomic
from nnunet_ext.pretrained import load_matching, same_tensor_names, state_dict_of


def _messages() -> tuple[list[str], callable]:
    messages = []
    return messages, messages.append


def test_full_checkpoint_loads_everything_but_the_segmentation_layers(tmp_path):
    source, target = make_net(), make_net()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    torch.save({"network_weights": source.state_dict()}, tmp_path / "checkpoint.pth")
    messages, log = _messages()
    result = load_matching(target, str(tmp_path / "checkpoint.pth"), log)
    assert result["not_loaded"] and all(".seg_layers." in k for k in result["not_loaded"])
    for key, value in target.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]) == (".seg_layers." not in key)
    assert "segmentation layers 0/" in messages[0] and "encoder" in messages[0]


def test_encoder_saved_alone_loads_into_the_encoder_and_the_decoder_is_listed(tmp_path):
    source, target = make_net(), make_net()
    with torch.no_grad():
        for p in source.encoder.parameters():
            p.add_(1.0)
    torch.save({"module._orig_mod." + k: v for k, v in source.encoder.state_dict().items()}, tmp_path / "enc.pt")
    messages, log = _messages()
    result = load_matching(target, str(tmp_path / "enc.pt"), log)
    assert set(result["loaded"]) == {f"encoder.{k}" for k in source.encoder.state_dict()}
    assert any(k.startswith("decoder.") for k in result["not_loaded"]) and not result["unused"]
    assert all(torch.equal(v, source.encoder.state_dict()[k]) for k, v in target.encoder.state_dict().items())
    assert any("not loaded (start as initialised)" in m for m in messages)


def test_shape_mismatch_is_listed_and_nothing_matching_is_refused_by_name(tmp_path):
    target = make_net()
    state = dict(target.state_dict())
    key = next(k for k in state if k.startswith("encoder.") and state[k].ndim > 1)
    names = [k for k, first in same_tensor_names(target).items() if first == key]  # e.g. decoder.encoder.<key>
    assert len(names) > 1
    other = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])
    for name in names:  # a file saved from another network has every name of the tensor with the other shape
        state[name] = other
    torch.save(state, tmp_path / "mismatch.pt")
    messages, log = _messages()
    result = load_matching(target, str(tmp_path / "mismatch.pt"), log)
    assert set(names) <= set(result["not_loaded"]) and set(names) <= set(result["unused"])
    assert any("shape differs" in m for m in messages)
    torch.save({"something.else": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: none of its 1 tensors matches"):
        load_matching(target, str(tmp_path / "other.pt"))
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pt: cannot be read"):
        load_matching(target, str(tmp_path / "broken.pt"))


def test_prefixes_are_stripped_only_at_the_start_of_a_key():
    t = torch.zeros(1)
    state = state_dict_of({"module._orig_mod.encoder.submodule.w": t, "_orig_mod.decoder.x_orig_mod.y": t,
                           "head.module.z": t}, "f.pth")
    assert list(state) == ["encoder.submodule.w", "decoder.x_orig_mod.y", "head.module.z"]


def test_json_goes_into_place_at_once_with_the_mode_open_gives(tmp_path, monkeypatch):
    path = str(tmp_path / "a.json")
    (tmp_path / "a.json.tmp").write_text("another writer's")  # the fixed names of before: never touched
    (tmp_path / "a.json.partial").write_text("another writer's")
    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        old = os.umask(umask)
        try:
            write_json_atomic(path, {"a": umask})
        finally:
            os.umask(old)
        assert os.stat(path).st_mode & 0o777 == mode
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": 0o027}
    assert (tmp_path / "a.json.tmp").read_text() == (tmp_path / "a.json.partial").read_text() == "another writer's"
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})  # not serializable: nothing written
    monkeypatch.setattr(os, "replace", lambda *_: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "{}")
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.json.partial", "a.json.tmp"]  # no temporary file left
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": 0o027}
    assert json_differences({"a": {"b": 1, "c": [1]}, "d": 1}, {"a": {"b": 1, "c": [2]}, "e": 1}) == ["a.c", "d", "e"]


def test_a_table_written_through_atomic_text_appears_whole_or_not_at_all(tmp_path):
    import csv

    path = str(tmp_path / "results.csv")
    with atomic_text(path) as f:
        writer = csv.writer(f)
        writer.writerows([["case", "dice"], ["a", 0.5]])
        assert not os.path.exists(path)  # nothing in place before the table is complete
    assert open(path, newline="").read() == "case,dice\r\na,0.5\r\n"  # csv's own line ends, untranslated
    with pytest.raises(RuntimeError, match="metric failed"):
        with atomic_text(path) as f:
            f.write("case,dice\r\n")
            raise RuntimeError("metric failed")
    assert open(path, newline="").read() == "case,dice\r\na,0.5\r\n"  # the complete old table is kept
    assert os.listdir(tmp_path) == ["results.csv"]


@pytest.mark.slow
def test_pretrained_weights_from_another_of_our_trainers_through_the_real_command(tiny_dataset, tmp_path):
    ds = tiny_dataset
    source = "EncDecTrainer_3labels_1epochs_2iters_noMirroring"
    folder = os.path.join(ds["results"], f"{source}__nnUNetCPUPlans__3d_fullres", "fold_0")
    checkpoint = os.path.join(folder, "checkpoint_final.pth")
    if not os.path.isfile(checkpoint):
        run(["nnUNetv2_train", str(ds["id"]), "3d_fullres", "0", "-p", "nnUNetCPUPlans", "-tr", source,
             "-device", "cpu"], ds["env"])
    encoder_only = tmp_path / "encoder.pt"
    weights = torch.load(checkpoint, weights_only=False)["network_weights"]
    torch.save({k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")}, encoder_only)
    for trainer, file in (("VAESegTrainer_3labels_1epochs_2iters_noMirroring", checkpoint),
                          ("MeanTeacherTrainer_3labels_1epochs_2iters_noMirroring", str(encoder_only))):
        proc = run(["nnUNetv2_train", str(ds["id"]), "3d_fullres", "0", "-p", "nnUNetCPUPlans", "-tr", trainer,
                    "-device", "cpu", "-pretrained_weights", file], ds["env"])
        assert f"[nnunet-ext] pretrained weights {file}: loaded" in proc.stdout
        assert "segmentation layers 0/" in proc.stdout
        if file == checkpoint:
            assert "decoder" in proc.stdout and "not loaded (start as initialised)" in proc.stdout
        else:
            assert "decoder 0/" in proc.stdout  # the encoder alone: the decoder starts as initialised
