"""Locks on study and training folders: one run at a time, the holder named, a killed run's lock taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from nnunet_ext import locks


def write_lock(path, pid: int, host: str = socket.gethostname()) -> None:
    """A lock file as another run leaves it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host, "since": "2026-01-01 10:00:00",
                                "command": "nnunet-ext study"}))


def dead_pid() -> int:
    """The pid of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_lock_is_held_once_and_released(tmp_path):
    path = str(tmp_path / "study" / locks.LOCK_FILE)
    with locks.held(path, "study folder S"):
        holder = json.loads(open(path).read())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(locks.LockedError, match=rf"study folder S is in use by pid {os.getpid()} on host "):
            locks.acquire(path, "study folder S")
    assert not os.path.exists(path)


def test_a_live_or_foreign_holder_is_named_and_a_dead_one_taken_over(tmp_path):
    path = tmp_path / locks.LOCK_FILE
    write_lock(path, os.getppid())  # a live process of this host
    with pytest.raises(locks.LockedError, match=rf"in use by pid {os.getppid()} on host .* since 2026-01-01 10:00:00 "
                                                rf"\(nnunet-ext study\); wait .* or, if it is gone .*, delete "):
        locks.acquire(str(path), "training fold 0 of T")
    write_lock(path, dead_pid(), "other-machine")  # another host: its pid cannot be checked from here
    with pytest.raises(locks.LockedError, match="on host other-machine"):
        locks.acquire(str(path), "training fold 0 of T")
    write_lock(path, dead_pid())  # killed on this host: stale, taken over
    with locks.held(str(path), "training fold 0 of T"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_a_child_works_under_its_parents_lock_and_nobody_elses(tmp_path, monkeypatch):
    path = str(tmp_path / "fold_0" / locks.LOCK_FILE)
    with locks.held(path, "training fold 0 of T"):
        # a process started by the holder (its environment names the holder): works under the lock, leaves it held
        monkeypatch.setattr(os, "environ", locks.child_environment(dict(os.environ)))
        assert locks.held_by_parent(path)
        with locks.held_unless_by_parent(path, "training fold 0 of T"):
            pass
        assert json.loads(open(path).read())["pid"] == os.getpid()
        # a process started by anyone else is refused
        monkeypatch.setitem(os.environ, locks.HOLDER_ENV, f"{socket.gethostname()}:{os.getppid()}")
        assert not locks.held_by_parent(path)
        with pytest.raises(locks.LockedError, match=f"training fold 0 of T is in use by pid {os.getpid()}"):
            with locks.held_unless_by_parent(path, "training fold 0 of T"):
                pass
        monkeypatch.delitem(os.environ, locks.HOLDER_ENV)
        with pytest.raises(locks.LockedError):
            with locks.held_unless_by_parent(path, "training fold 0 of T"):
                pass
    assert not os.path.exists(path)
    # nobody holds it: the process takes it itself and releases it
    with locks.held_unless_by_parent(path, "training fold 0 of T"):
        assert json.loads(open(path).read())["pid"] == os.getpid()
    assert not os.path.exists(path)
