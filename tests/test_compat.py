"""One test per coupling of nnunet_ext to nnU-Net internals (nnunet_ext/compat.py): each asserts, against the
installed nnU-Net, the precondition its coupling relies on, so an nnU-Net upgrade that breaks one fails here
with a message naming it; and each shows that the coupling's own check fails loudly when the precondition goes."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_ext.compat import (
    CompatibilityError,
    after_zero_grad,
    captured_augmentation,
    captured_checkpoint_load,
    captured_checkpoint_save,
    network_built_by,
    planning_n_proc_DA,
    random_crops_only,
    save_preprocessed_case,
    unwrap_network,
)
from nnunet_ext.data.budgets import LABELED_IDS_FILE
from nnunet_ext.data.unlabeled import folder_dataset_class
from nnunet_ext.trainers.multitask import MultiTaskNetwork

VAE = "VAESegTrainer_3labels_1epochs_2iters_noMirroring"


# -- network_built_by: the training network is net + branch, the inference network stays plain ----------------
@pytest.mark.slow
def test_initialize_builds_the_training_network_through_self_once(make_trainer):
    trainer = make_trainer(VAE)
    trainer.initialize()
    network = unwrap_network(trainer.network, MultiTaskNetwork)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimized for p in network.branch.parameters())  # built before the optimizer
    assert "build_network_architecture" not in vars(trainer)
    plain = type(trainer).build_network_architecture(  # what nnUNetPredictor builds
        trainer.plans_manager, trainer.configuration_manager, trainer.num_input_channels,
        trainer.label_manager.num_segmentation_heads, False)
    plain.load_state_dict(network.state_dict(), strict=True)


def test_network_built_by_fails_loudly_when_not_called_once_or_called_otherwise():
    trainer = SimpleNamespace()

    def builder(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                enable_deep_supervision=True):
        return torch.nn.Identity()

    with pytest.raises(CompatibilityError, match="'network_built_by'.*called 0 times"):
        with network_built_by(trainer, builder):
            pass
    with pytest.raises(CompatibilityError, match="'network_built_by'.*with arguments"):
        with network_built_by(trainer, builder):
            trainer.build_network_architecture("arch_class_name", {}, (), 4, 3, True, "one too many")
    assert not vars(trainer)


# -- captured_augmentation and random_crops_only: the unlabeled stream crops and augments like the labeled one --
@pytest.mark.slow
def test_get_dataloaders_builds_transforms_and_patch_size_through_self_once(make_trainer):
    trainer = make_trainer(VAE)
    trainer.initialize()
    with captured_augmentation(trainer) as setup:
        dataloader_train, dataloader_val = trainer.get_dataloaders()
    labeled = dataloader_train.data_loader  # nnUNet_n_proc_DA=0: a SingleThreadedAugmenter
    assert setup.transforms is labeled.transforms
    assert setup.initial_patch_size == tuple(labeled.patch_size)
    assert not {"get_training_transforms", "configure_rotation_dummyDA_mirroring_and_inital_patch_size"} & set(
        vars(trainer))
    with pytest.raises(CompatibilityError, match="'captured_augmentation'.*called 0 times"):
        with captured_augmentation(trainer):
            pass


class Cases:
    """A stand-in dataset: one labeled case without class locations (as an unlabeled one)."""

    identifiers = ["a"]

    def load_case(self, identifier):
        return np.ones((1, 10, 6, 8), np.float32), np.zeros((1, 10, 6, 8), np.int16), None, {"class_locations": None}


@pytest.mark.parametrize("probabilistic", [False, True])
def test_nnunet_loader_crops_at_random_once_has_ignore_is_off(probabilistic):
    manager = LabelManager({"background": 0, "tumour": 1, "ignore": 2}, None)
    loader = nnUNetDataLoader(Cases(), 4, (4, 4, 4), (4, 4, 4), manager, oversample_foreground_percent=0.0,
                              probabilistic_oversampling=probabilistic)
    assert loader.has_ignore  # nnU-Net would crop around annotated voxels ...
    with pytest.raises(TypeError):
        loader.get_bbox((10, 6, 8), False, None)  # ... which an unlabeled case does not have
    random_crops_only(loader)
    assert not any(loader.get_do_oversample(j) for _ in range(200) for j in range(4))  # both oversampling modes
    lower, upper = loader.get_bbox((10, 6, 8), False, None)
    assert [u - lo for lo, u in zip(lower, upper)] == [4, 4, 4]
    assert next(loader)["data"].shape == (4, 1, 4, 4, 4)


def test_random_crops_only_fails_loudly_without_its_precondition():
    manager = LabelManager({"background": 0, "tumour": 1}, None)
    forcing = nnUNetDataLoader(Cases(), 2, (4, 4, 4), (4, 4, 4), manager, oversample_foreground_percent=1.0)
    with pytest.raises(CompatibilityError, match="'random_crops_only'.*never to force foreground"):
        random_crops_only(forcing)
    with pytest.raises(CompatibilityError, match="'random_crops_only'.*has_ignore"):
        random_crops_only(SimpleNamespace(batch_size=2, get_do_oversample=lambda j: False))


# -- after_zero_grad: the unlabeled pass accumulates into nnU-Net's one optimizer step --------------------------
def test_train_step_clears_gradients_once_before_its_forward():
    trainer = object.__new__(nnUNetTrainer)
    network = torch.nn.Conv3d(1, 1, 1)
    trainer.__dict__.update(device=torch.device("cpu"), grad_scaler=None, network=network, loss=torch.nn.MSELoss(),
                            optimizer=torch.optim.SGD(network.parameters(), lr=0.1))
    forward_saw = []
    network.register_forward_pre_hook(lambda *_: forward_saw.append(ran[:]))
    ran = []
    with after_zero_grad(trainer.optimizer, lambda: ran.append(True)):  # raises unless called exactly once
        nnUNetTrainer.train_step(trainer, {"data": torch.ones(1, 1, 2, 2, 2), "target": torch.zeros(1, 1, 2, 2, 2)})
    assert forward_saw == [[True]]  # the action ran after zero_grad and before nnU-Net's forward


# -- seeded_augmenters: _s<S> trainers seed nnU-Net's augmentation workers --------------------------------------
@pytest.mark.slow
def test_get_dataloaders_builds_the_module_augmenter_train_then_val(make_trainer, monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    trainer = make_trainer("EncDecTrainer_3labels_1epochs_2iters_noMirroring_s3")
    trainer.initialize()
    loaders = trainer.get_dataloaders()  # ExtTrainer's: nnU-Net's under seeded_augmenters(trainer.augmenter_seeds)
    try:
        assert [loader.seeds for loader in loaders] == [[3000], [3100]]
    finally:
        for loader in loaders:
            loader._finish()


# -- captured_checkpoint_save / _load: the branch rides in nnU-Net's own checkpoint, written and read once -------
@pytest.mark.slow
def test_checkpoint_is_nnunets_dictionary_plus_the_branch_written_and_read_once(make_trainer, tmp_path, monkeypatch):
    trainer = make_trainer(VAE)
    trainer.initialize()
    writes, reads = [], []
    real_save, real_load = torch.save, torch.load
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: writes.append(str(f)) or real_save(obj, f, *a, **k))
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(str(f)) or real_load(f, *a, **k))
    path = str(tmp_path / "checkpoint.pth")
    trainer.save_checkpoint(path)
    assert writes == [path + ".partial"] and os.listdir(tmp_path) == ["checkpoint.pth"]
    saved = real_load(path, map_location="cpu", weights_only=False)
    assert {"network_weights", "optimizer_state", "current_epoch", "init_args", "trainer_name",
            "inference_allowed_mirroring_axes", "branch_weights", "branch_class"} <= set(saved)
    branch = trainer.multitask_network.branch
    expected = {k: v.clone() for k, v in branch.state_dict().items()}
    with torch.no_grad():
        for p in branch.parameters():
            p.add_(1.0)
    trainer.load_checkpoint(path)
    assert reads == [path]
    assert all(torch.equal(v, expected[k]) for k, v in branch.state_dict().items())


def test_checkpoint_capture_fails_loudly_when_nnunet_saves_or_loads_otherwise():
    with pytest.raises(CompatibilityError, match="'captured_checkpoint_save'.*saved 0"):
        with captured_checkpoint_save():
            pass
    with pytest.raises(CompatibilityError, match="'captured_checkpoint_load'.*loaded 0 times"):
        with captured_checkpoint_load("checkpoint.pth"):
            pass
    with captured_checkpoint_load({"branch_weights": {}}) as loaded:
        pass
    assert loaded == [{"branch_weights": {}}]


# -- unwrap_network: the module inside DDP and torch.compile ----------------------------------------------------
def test_torch_compile_wraps_the_module_where_unwrap_finds_it():
    module = torch.nn.Linear(2, 2)
    compiled = torch.compile(module, backend="eager")
    assert unwrap_network(compiled, torch.nn.Linear) is module
    with pytest.raises(CompatibilityError, match="'unwrap_network'.*MultiTaskNetwork.*found Linear"):
        unwrap_network(compiled, MultiTaskNetwork)


# -- save_preprocessed_case: unlabeled cases are written as nnU-Net's preprocessor writes, read as nnU-Net reads --
def test_preprocessor_writes_through_run_case_in_a_format_nnunet_infers(tmp_path):
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    data = np.random.default_rng(0).normal(size=(2, 12, 10, 8)).astype(np.float32)
    case = (data, np.zeros((1, 12, 10, 8), np.int8), {"class_locations": {}, "spacing": [1.0, 1.0, 1.0]})
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    assert folder_dataset_class(str(folder)) is None  # no case yet
    save_preprocessed_case(DefaultPreprocessor(verbose=False), str(folder / "U_001"), case, ["U_001_0000.nii.gz"],
                           None, SimpleNamespace(patch_size=(8, 8, 8)), {})
    cls = folder_dataset_class(str(folder))
    assert cls is nnUNetDatasetBlosc2  # what nnU-Net 2.8 writes, whatever the labeled folder holds
    loaded, seg, _, properties = cls(str(folder), ["U_001"]).load_case("U_001")
    np.testing.assert_array_equal(np.asarray(loaded), data)
    assert properties == case[2] and np.asarray(seg).dtype == np.int16
    (folder / "U_002.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unlabeled: its cases are not in one file format.*rerun"):
        folder_dataset_class(str(folder))


def test_save_preprocessed_case_fails_loudly_when_nnunet_writes_otherwise(tmp_path):
    class ReadsItself:
        def run_case_save(self, output_filename_truncated, *args):
            pass  # never asks run_case

    with pytest.raises(CompatibilityError, match="'save_preprocessed_case'.*called 0 times"):
        save_preprocessed_case(ReadsItself(), str(tmp_path / "U"), (None, None, {}), [], None, None, {})


# -- planning_n_proc_DA: nnU-Net's planner and nnUNet_n_proc_DA=0 ---------------------------------------------
def test_planner_fails_with_zero_augmentation_workers_unless_planning_with_one(monkeypatch, capsys):
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    estimate = [(8, 8, 8), 1, 2, "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                {"n_stages": 1, "features_per_stage": (4,), "conv_op": "torch.nn.modules.conv.Conv3d",
                 "kernel_sizes": ((3, 3, 3),), "strides": ((1, 1, 1),), "n_conv_per_stage": (1,),
                 "n_conv_per_stage_decoder": (), "conv_bias": True, "norm_op": None, "norm_op_kwargs": None,
                 "dropout_op": None, "dropout_op_kwargs": None, "nonlin": None, "nonlin_kwargs": None},
                ("conv_op", "norm_op", "dropout_op", "nonlin")]
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    with pytest.raises(RuntimeError, match="positive"):  # when nnU-Net fixes this, planning_n_proc_DA can go
        ExperimentPlanner.static_estimate_VRAM_usage(*estimate)
    with planning_n_proc_DA():
        assert ExperimentPlanner.static_estimate_VRAM_usage(*estimate) > 0  # the planner reads it when it plans
    assert os.environ["nnUNet_n_proc_DA"] == "0" and "planning with 1" in capsys.readouterr().out


# -- ExtTrainer.do_split: no longer a coupling (nnU-Net splits again for the final validation) -------------------
@pytest.mark.slow
def test_budget_split_is_computed_logged_and_written_once(make_trainer, monkeypatch):
    trainer = make_trainer("EncDecTrainer_3labels_1epochs_2iters_noMirroring_s4")
    logged = []
    monkeypatch.setattr(trainer, "print_to_log_file", lambda *a, **k: logged.append(" ".join(map(str, a))))
    first = trainer.do_split()
    labeled = list(first[0])
    first[0].sort(reverse=True)  # callers may sort what they get (nnU-Net's datasets do)
    path = os.path.join(trainer.output_folder, LABELED_IDS_FILE)
    assert json.load(open(path))["labeled"] == labeled and len(labeled) == 3
    os.remove(path)
    assert trainer.do_split() == (labeled, first[1])  # the same split again ...
    assert not os.path.exists(path) and sum("Label budget 3" in line for line in logged) == 1  # ... not redone


def test_trainers_honour_omp_num_threads_on_cpu_only(monkeypatch):
    """nnUNetv2_train -device cpu sets torch's threads to every core; our trainers set OMP_NUM_THREADS back."""
    import torch

    from nnunet_ext.trainers.base import honour_omp_num_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert honour_omp_num_threads(torch.device("cpu")) == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert honour_omp_num_threads(torch.device("cuda")) is None and torch.get_num_threads() == 2
        for unset in ("", "0", "four"):
            monkeypatch.setenv("OMP_NUM_THREADS", unset)
            assert honour_omp_num_threads(torch.device("cpu")) is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
