"""Print the shell line that makes nnU-Net find nnunet_ext's trainers.

Installing nnunet_ext already sets ``nnUNet_extTrainer`` at every Python start (a .pth hook); use this
when the hook is disabled (NNUNET_EXT_NO_AUTOREGISTER=1) or to set the variable yourself.
"""

from __future__ import annotations

import argparse
import os
import shlex

from nnunet_ext._startup import ENV_VAR, TRAINER_SEARCH_FOLDER, with_search_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options."""


def run(args: argparse.Namespace) -> int:
    """Print ``export nnUNet_extTrainer=...`` keeping folders the user already listed."""
    current = os.environ.get(ENV_VAR)
    # the hook may already have appended our folder; show the user's own entries plus ours once
    print(f"export {ENV_VAR}={shlex.quote(with_search_folder(current))}")
    print(f"# trainer search folder: {TRAINER_SEARCH_FOLDER}")
    return 0
