"""Atomic, durable file writes for exported artifacts: a temporary file next to the target, fsync, rename, fsync
of the folder. A crash leaves either the old file or the new one, never a torn one; a failed check leaves nothing.
The file gets the permissions of any new file (0666 less the umask, e.g. 0644), not the temporary file's 0600."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from dino.durable import fsync_path, give_new_file_mode


def commit(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Moves the finished temporary file ``tmp`` onto ``path`` durably (fsync file, rename, fsync folder)."""
    path = Path(path)
    give_new_file_mode(tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)
    return path


@contextlib.contextmanager
def staged(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yields a temporary path next to ``path`` (same folder, so the final rename is atomic); the caller writes
    and checks it, then calls :func:`commit`. The temporary file is removed if the block raises or never commits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix if suffix is not None else path.suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Writes ``data`` to ``path`` atomically and durably."""
    with staged(path) as tmp:
        tmp.write_bytes(data)
        return commit(tmp, path)
