"""Trainer-name grammar: valid names, clear errors, generated classes nnU-Net can find and pickle."""

import importlib.util
import os
import pickle

import pytest

from nnunet_ext._startup import TRAINER_SEARCH_FOLDER
from nnunet_ext.trainers.encdec import EncDecTrainer
from nnunet_ext.trainers.names import TrainerNameError, TrainerSpec, parse_trainer_name, trainer_class


@pytest.mark.parametrize("name, spec", [
    ("EncDecTrainer", TrainerSpec("EncDecTrainer")),
    ("EncDecTrainer_6labels", TrainerSpec("EncDecTrainer", labels=6)),
    ("EncDecTrainer_300epochs", TrainerSpec("EncDecTrainer", epochs=300)),
    ("EncDecTrainer_12labels_5epochs_10iters_noMirroring",
     TrainerSpec("EncDecTrainer", labels=12, epochs=5, iters=10, mirroring=False)),
    ("EncDecTrainer_noMirroring", TrainerSpec("EncDecTrainer", mirroring=False)),
])
def test_valid_names(name, spec):
    assert parse_trainer_name(name) == spec


@pytest.mark.parametrize("name, message", [
    ("EncDecTrainer_0labels", "positive integer"),
    ("EncDecTrainer_06labels", "leading zeros"),
    ("EncDecTrainer_5epochs_6labels", "out of order"),
    ("EncDecTrainer_6labels_6labels", "repeated"),
    ("EncDecTrainer_6label", "unknown suffix '_6label'"),
    ("EncDecTrainer_6labels_", "unknown suffix"),
    ("EncDecTrainer_6labels_10unlabeled", "semi-supervised"),
    ("EncDecTrainer_sixlabels", "unknown suffix"),
])
def test_invalid_names_say_what_is_wrong(name, message):
    with pytest.raises(TrainerNameError, match=message):
        parse_trainer_name(name)


def test_generated_class_carries_spec_and_pickles():
    cls = trainer_class("EncDecTrainer_3labels_2epochs")
    assert issubclass(cls, EncDecTrainer) and cls.__name__ == "EncDecTrainer_3labels_2epochs"
    assert cls.trainer_spec == TrainerSpec("EncDecTrainer", labels=3, epochs=2)
    assert trainer_class("EncDecTrainer_3labels_2epochs") is cls
    assert pickle.loads(pickle.dumps(cls)) is cls
    assert trainer_class("EncDecTrainer") is EncDecTrainer


def test_search_module_answers_hasattr_like_nnunet_asks():
    path = os.path.join(TRAINER_SEARCH_FOLDER, "nnunet_ext_trainers.py")
    spec = importlib.util.spec_from_file_location("nnunet_ext_trainers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert hasattr(module, "EncDecTrainer_6labels_100epochs")
    assert not hasattr(module, "nnUNetTrainer")  # not ours: nnU-Net keeps searching
    assert not hasattr(module, "SomeOtherTrainer_6labels")
    with pytest.raises(TrainerNameError):
        hasattr(module, "EncDecTrainer_0labels")


def test_nnunet_trainer_search_finds_generated_names():
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    cls = recursive_find_trainer_class_by_name("EncDecTrainer_4labels_noMirroring")
    assert cls.trainer_spec == TrainerSpec("EncDecTrainer", labels=4, mirroring=False)
