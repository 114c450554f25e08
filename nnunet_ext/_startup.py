"""Runs at interpreter start (via nnunet_ext_startup.pth): lets nnU-Net find our trainers.

Adds our trainer search folder to the ``nnUNet_extTrainer`` environment variable when it is missing,
so ``nnUNetv2_train/predict -tr EncDecTrainer...`` work in any shell. Imports nothing heavy.
"""

import os

TRAINER_SEARCH_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainers", "search_path")
ENV_VAR = "nnUNet_extTrainer"


def with_search_folder(value: str | None) -> str:
    """Return ``value`` (an os.pathsep-separated list) with our folder appended when it is absent."""
    parts = [p for p in (value or "").split(os.pathsep) if p]
    if not any(os.path.abspath(p) == TRAINER_SEARCH_FOLDER for p in parts):
        parts.append(TRAINER_SEARCH_FOLDER)
    return os.pathsep.join(parts)


if os.environ.get("NNUNET_EXT_NO_AUTOREGISTER") != "1":
    os.environ[ENV_VAR] = with_search_folder(os.environ.get(ENV_VAR))
