"""Which trainer wrote a checkpoint, and the error when it is not the trainer that reads it.

nnU-Net finds a fold's checkpoint by folder name (``<trainer>__<plans>__<configuration>/fold_F``) but predicts with
the trainer class named inside it (``trainer_name``), and ``--c`` resumes whatever checkpoint lies in the folder.
A result folder renamed or copied from another trainer's therefore resumes that trainer's weights, optimizer and
epoch under a new name (a silently mixed training), or is skipped by the study as trained and then fails at
prediction. Both are refused here, by name, before anything is trained or written.
"""

from __future__ import annotations

import os


class ForeignCheckpointError(ValueError):
    """A checkpoint in a trainer's result folder was written by another trainer."""


def entry(path: str, key: str):
    """The entry ``key`` of the checkpoint file ``path`` (None when it has none). The file is memory-mapped, so only
    the entries read are loaded, not the weights."""
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    return checkpoint.get(key) if isinstance(checkpoint, dict) else None


def written_by(path: str) -> str | None:
    """The ``trainer_name`` nnU-Net recorded in the checkpoint file ``path`` (None when it records none)."""
    return entry(path, "trainer_name")


def check_written_by(found: str | None, path: str, expected: str) -> None:
    """Raise :class:`ForeignCheckpointError` when the checkpoint ``path`` names a trainer ``found`` other than
    ``expected`` (a checkpoint that names none is accepted: nothing to compare)."""
    if found is None or found == expected:
        return
    folder = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    rest = os.path.basename(folder).partition("__")[2]
    raise ForeignCheckpointError(
        f"{path} was written by trainer {found}, not {expected}: its result folder was renamed or copied from "
        f"another trainer's. Resuming it (--c) would continue {found}'s training under the name {expected}, and "
        f"nnUNetv2_predict would look for {found}. Rename the folder back to {found}__{rest} "
        f"or move it away to train {expected} from scratch.")
