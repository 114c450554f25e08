"""Files written into place at once: readers see the old content or the new, never a part.

One writer for every JSON file nnunet_ext keeps (records, plans, requests): the text goes to a temporary file with
a unique name in the target's folder (so the rename stays on one file system and two writers never share a
temporary file), is flushed to disk, then ``os.replace`` puts it in place. The file gets the mode a plain
``open(path, "w")`` would give (0o666 less the umask, i.e. 0644 under the usual umask 022), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
from collections.abc import Iterator


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` at once (a unique temporary file beside it, fsynced, then ``os.replace``)."""
    folder, name = os.path.split(os.path.abspath(path))
    while True:
        partial = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
        try:  # O_EXCL: never another writer's temporary file; mode 0o666 less the umask, as open() gives
            handle = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(handle, "w", newline="") as f:  # the text as given (csv's line ends included)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.unlink(partial)
        raise


@contextlib.contextmanager
def atomic_text(path: str) -> Iterator[io.StringIO]:
    """A text buffer for the block (``csv.writer`` takes it like a file), written to ``path`` at once
    (:func:`write_text_atomic`) when the block ends; nothing is written when it raises."""
    buffer = io.StringIO(newline="")
    yield buffer
    write_text_atomic(path, buffer.getvalue())


def write_json_atomic(path: str, content: object, indent: int | None = 1) -> None:
    """Write ``content`` as JSON to ``path`` at once (:func:`write_text_atomic`); nothing is written when it is not
    serializable."""
    write_text_atomic(path, json.dumps(content, indent=indent))


def json_differences(old: object, new: object, limit: int = 5, _at: str = "") -> list[str]:
    """The dotted paths where two JSON documents differ (at most ``limit``, depth-first), e.g.
    ``configurations.3d_fullres.patch_size``."""
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[str] = []
        for key in list(old) + [k for k in new if k not in old]:
            if len(found) >= limit:
                break
            at = f"{_at}.{key}" if _at else str(key)
            if key not in old or key not in new:
                found.append(at)
            else:
                found += json_differences(old[key], new[key], limit - len(found), at)
        return found
    return [] if old == new else [_at or "(the whole document)"]


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes (a checkpoint's identity in the records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
