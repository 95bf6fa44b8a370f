"""Durable file-system updates: content and names survive a crash or a power loss.

``os.replace`` alone survives a crash of the process, but after a power loss the new name may point to a file whose
data never reached the disk, or the rename itself may be lost. The data (file or folder tree) is therefore fsynced
before the rename, and the parent folder (which holds the name) after it.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from dino.errors import UserError

# The errors of a full disk or an exhausted quota: the user frees space or writes elsewhere.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})

# The process umask, read once at import: os.umask can only be read by setting it, which is not thread-safe later.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def give_new_file_mode(path: str | os.PathLike) -> None:
    """The permissions of any new file (0666 less the umask, e.g. 0644) for a temporary file that ``mkstemp`` made
    private (0600) and that is about to become a user's output."""
    os.chmod(path, 0o666 & ~_UMASK)


def fsync_path(path: str | os.PathLike) -> None:
    """Flushes a file's data, or a folder's entries, to the disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except (IsADirectoryError, PermissionError):  # folders cannot be opened on Windows; nothing to flush there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync of every file and folder under ``path`` (folders after their contents), then of ``path`` itself."""
    path = Path(path)
    if path.is_dir():
        for child in path.iterdir():
            fsync_tree(child)
    fsync_path(path)


def replace_durably(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``os.replace(src, dst)`` with ``src`` (file or folder tree) on disk before and the new name on disk after."""
    fsync_tree(src)
    os.replace(src, dst)
    fsync_path(Path(dst).parent)


def write_text_durably(text: str, path: str | os.PathLike) -> None:
    """Writes ``text`` to a temp file next to ``path`` and moves it into place durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(obj, path: str | os.PathLike, indent: int | None = 1) -> None:
    """Writes ``obj`` as JSON atomically and durably."""
    separators = None if indent is not None else (",", ":")
    write_text_durably(json.dumps(obj, indent=indent, separators=separators), path)


def make_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Creates the output folder ``path`` (``what``: the field or flag that named it) or checks it is writable.

    UserError (one line naming ``what`` and ``path``) when ``path`` or a parent is a file, cannot be created, or is
    not writable (read-only folder or file system), so a run fails before it starts instead of at its first save.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder; choose another {what}")
    existing = next((p for p in path.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"{what} {path}: {existing} is a file, not a folder; choose another {what}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{what} {path} cannot be created ({err.strerror}); choose a writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} is not writable (read-only folder or file system); choose a writable folder")
    return path


def real_path(path: str | os.PathLike) -> str:
    """``path`` as the file system resolves it: absolute, ``..`` and every symlink followed (a loop left as is)."""
    return os.path.realpath(os.path.abspath(path))


def is_one_of(path: str | os.PathLike, inputs) -> str | os.PathLike | None:
    """The first of ``inputs`` (paths of files a command reads; None skipped) that ``path`` would write over, however
    either is spelled: the same real path (:func:`real_path`), or the same existing file (a hard link); else None."""
    target = real_path(path)
    for given in inputs:
        if given is None:
            continue
        if real_path(given) == target:
            return given
        try:
            if os.path.samefile(path, given):
                return given
        except OSError:  # either does not exist (yet): nothing to compare
            continue
    return None


def refuse_input(path: str | os.PathLike, flag: str, inputs) -> None:
    """UserError (one line naming ``flag``) when the output ``path`` is one of ``inputs`` (:func:`is_one_of`)."""
    given = is_one_of(path, inputs)
    if given is not None:
        same = "" if str(given) == str(path) else f" ({given}, spelled differently)"
        raise UserError(f"{flag} {path} is also this command's input{same}: writing it would replace that input; "
                        f"choose another {flag}")


def check_output_file(path: str | os.PathLike, flag: str, example: str, inputs: tuple = (),
                      replaces: tuple[str, ...] | None = None) -> Path:
    """Refuses, before any work, an output file that cannot be written: ``path`` is a folder (``example``: a file
    name to suggest in it, e.g. "model.onnx"), a parent is a file, the nearest existing folder is not writable,
    ``path`` is one of the command's ``inputs`` (the files it reads, folders resolved by the caller to the files read
    in them, e.g. a run folder to its model.safetensors; compared by :func:`is_one_of`), or, with ``replaces`` (the
    suffixes of an older output of this kind, e.g. ``(".onnx",)``), an existing file of another kind (weights, an
    image, anything else: an export replaces only an older export of its own kind). UserError names ``flag`` and
    says what to give instead; returns ``path``."""
    path = Path(path)
    refuse_input(path, flag, inputs)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give the file to write, e.g. {flag} {path / example}")
    if replaces is not None and (path.exists() or path.is_symlink()) and path.suffix.lower() not in replaces:
        raise UserError(f"{flag} {path} exists and is not an older {' / '.join(replaces)} file of this kind: writing "
                        f"it would replace that file; choose another {flag} (e.g. {path.with_name(example)})")
    existing = next((p for p in path.parents if p.exists()), Path("."))
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder; choose another {flag}")
    try:  # the one sure test (os.access says yes to root on a read-only file system or in /sys)
        fd, probe = tempfile.mkstemp(prefix=".dino-write-test.", dir=existing)
    except OSError as err:
        raise UserError(f"{flag} {path} cannot be written: {existing} is not writable ({err.strerror}); choose a "
                        "writable folder") from None
    os.close(fd)
    os.unlink(probe)
    return path


def no_space_error(err: BaseException, path: str | os.PathLike, note: str = "", what: str = "") -> UserError | None:
    """The one-line UserError for a write into ``path`` that failed for lack of space, or None for other errors;
    ``what`` goes before the path ("checkpoint "), ``note`` after it (what was cleaned up).

    A full disk reaches Python in three forms: an OSError (ENOSPC / EDQUOT), a safetensors error carrying the OS
    message ("No space left on device (os error 28)"), and torch.save's RuntimeError, which does not say why
    ("PytorchStreamWriter failed writing file" / "unexpected pos"): that one counts when the disk has under
    :data:`LOW_SPACE_BYTES` free.
    """
    text = str(err)
    if isinstance(err, OSError) and err.errno in NO_SPACE:
        quota = err.errno == errno.EDQUOT
    elif any(m in text for m in ("No space left on device", f"os error {errno.ENOSPC}")):
        quota = False
    elif any(m in text for m in ("Disk quota exceeded", f"os error {errno.EDQUOT}")):
        quota = True
    elif isinstance(err, RuntimeError) and "inline_container" in text and _free_bytes(path) < LOW_SPACE_BYTES:
        quota = False
    else:
        return None
    reason = "disk quota exceeded" if quota else "no space left on device"
    return UserError(f"{reason} while writing {what}{path}{note}; free some space (or choose another folder) and rerun")


# torch.save's write errors do not say why; below this much free space the reason is taken to be the disk.
LOW_SPACE_BYTES = 64 * 2**20


def _free_bytes(path: str | os.PathLike) -> int:
    existing = next((p for p in (Path(path), *Path(path).parents) if p.exists()), Path("."))
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return LOW_SPACE_BYTES
