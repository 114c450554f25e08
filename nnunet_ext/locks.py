"""Locks that keep two runs out of one folder: a study's output folder, a training fold's result folder.

A lock is a small JSON file created atomically (``O_CREAT | O_EXCL``) holding the pid, host, start time and
command of the run that holds it, and removed when that run is done. A lock whose run is gone (same host, pid
no longer alive) is stale and taken over, so a killed run never blocks the next one; a lock held by a live
process, or by any process of another host (whose pids cannot be checked from here), is refused with an error
that names the run holding it.

A training fold is locked by the trainer itself (``ExtTrainer.run_training``), so two plain ``nnUNetv2_train``
runs of one fold are kept apart too. A runner of ours (study, demo) takes the fold's lock before it checks whether
the fold is trained and starts ``nnUNetv2_train``; it names itself in :data:`HOLDER_ENV` of the commands it starts
(:func:`child_environment`), and the trainer then trains under its parent's lock instead of refusing it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator

LOCK_FILE = ".nnunet_ext.lock"  # in the locked folder
HOLDER_ENV = "NNUNET_EXT_LOCK_HOLDER"  # "host:pid" of the runner that started this process


class LockedError(FileExistsError):
    """The folder is locked by another run (a user error: the message names that run)."""


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _holder(path: str) -> dict | None:
    """The run recorded in a lock file, or None when the file vanished or is unreadable (being written)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _is_stale(holder: dict) -> bool:
    """Whether the run that holds a lock is gone: same host and its pid is not alive."""
    return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1)))


def _try_create(path: str, what: str) -> bool:
    """Create the lock file with this run's pid, host, time and command; False when it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                   "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}, f)
    return True


def acquire(path: str, what: str) -> None:
    """Take the lock file ``path`` for ``what`` (e.g. 'study folder X'); take over a stale one; raise LockedError
    naming the run that holds it otherwise."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for _ in range(3):  # a stale lock removed by a concurrent run between our attempts: try again
        if _try_create(path, what):
            return
        holder = _holder(path)
        if holder is not None and not _is_stale(holder):
            raise LockedError(f"{what} is in use by pid {holder.get('pid')} on host {holder.get('host')} since "
                              f"{holder.get('since')} ({holder.get('command')}); wait until that run ends, or, if it "
                              f"is gone (e.g. killed on another machine), delete {path}.")
        if holder is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        else:
            time.sleep(0.1)  # being written by the run that just created it
    raise LockedError(f"{what}: could not take {path}; another run keeps creating it. Try again.")


def release(path: str) -> None:
    """Remove a lock file this process holds (left alone when another process holds it now)."""
    holder = _holder(path)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        os.remove(path)


@contextlib.contextmanager
def held(path: str, what: str) -> Iterator[None]:
    """Hold the lock file ``path`` for the duration of the block (see :func:`acquire`)."""
    acquire(path, what)
    try:
        yield
    finally:
        release(path)


def child_environment(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a command this process starts: it names this process in :data:`HOLDER_ENV`, so the command may
    work under a lock this process holds (:func:`held_unless_by_parent`)."""
    return {**env, HOLDER_ENV: f"{socket.gethostname()}:{os.getpid()}"}


def held_by_parent(path: str) -> bool:
    """Whether the lock file ``path`` is held, alive, by the run that started this process (its :data:`HOLDER_ENV`)."""
    holder, parent = _holder(path), os.environ.get(HOLDER_ENV)
    return (holder is not None and parent == f"{holder.get('host')}:{holder.get('pid')}"
            and not _is_stale(holder))


@contextlib.contextmanager
def held_unless_by_parent(path: str, what: str) -> Iterator[None]:
    """Hold ``path`` for the block like :func:`held`, unless the run that started this process holds it already (a
    study training a fold through ``nnUNetv2_train``): then work under that lock and leave it to its holder."""
    if held_by_parent(path):
        yield
        return
    with held(path, what):
        yield
