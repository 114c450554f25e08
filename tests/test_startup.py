"""The installed startup hook makes nnU-Net find our trainers in any fresh Python process."""

import os
import subprocess
import sys

from nnunet_ext._startup import TRAINER_SEARCH_FOLDER, with_search_folder


def test_with_search_folder_appends_once():
    assert with_search_folder(None) == TRAINER_SEARCH_FOLDER
    assert with_search_folder("/a") == os.pathsep.join(["/a", TRAINER_SEARCH_FOLDER])
    twice = with_search_folder(with_search_folder("/a"))
    assert twice.split(os.pathsep).count(TRAINER_SEARCH_FOLDER) == 1


def test_fresh_interpreter_has_variable_set():
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    out = subprocess.run([sys.executable, "-c", "import os; print(os.environ['nnUNet_extTrainer'])"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == TRAINER_SEARCH_FOLDER
    env["nnUNet_extTrainer"] = "/somewhere/else"
    out = subprocess.run([sys.executable, "-c", "import os; print(os.environ['nnUNet_extTrainer'])"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out.split(os.pathsep) == ["/somewhere/else", TRAINER_SEARCH_FOLDER]


def test_env_command_prints_export_line():
    out = subprocess.run(["nnunet-ext", "env"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("export nnUNet_extTrainer=") and TRAINER_SEARCH_FOLDER in out
