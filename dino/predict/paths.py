"""Which files ``dino predict`` reads and where it may write: inputs listed from files and folders (an earlier run's
outputs left out), an output folder refused when it could replace or feed an input, one distinct picture name per
input."""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import PIL.Image

from dino.durable import is_one_of
from dino.errors import UserError
from dino.untrusted import parse_json

PICTURE_SUFFIX = ".jpg"
PREDICTIONS_MAX_BYTES = 2**30  # an earlier run's predictions.json: about 1 kB an image


def earlier_outputs(folder: Path) -> set[str]:
    """Names of an earlier ``dino predict``'s outputs in ``folder``: its predictions.json and the pictures it lists
    (empty when the folder holds no predictions.json of this format)."""
    try:
        path = folder / "predictions.json"
        if path.stat().st_size > PREDICTIONS_MAX_BYTES:  # not one this project wrote: its name is all it shares
            return set()
        result = parse_json(path.read_bytes(), PREDICTIONS_MAX_BYTES)  # Invalid is a ValueError
        pictures = {r["picture"] for r in result["images"] if r.get("picture")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {"predictions.json", *(str(p) for p in pictures)}


def image_suffixes() -> frozenset[str]:
    """The file name suffixes (lower case, ``.jpg``) of the image formats Pillow can open here."""
    extensions = PIL.Image.registered_extensions()  # loads Pillow's format plugins, which fill PIL.Image.OPEN
    return frozenset(ext for ext, fmt in extensions.items() if fmt in PIL.Image.OPEN)


def list_inputs(inputs: list[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """Files to predict on: the given files, and the image files of the given folders (non-hidden, with the suffix
    of a format Pillow opens, :func:`image_suffixes`; sorted, not recursive), except an earlier ``dino predict``'s
    outputs there (:func:`earlier_outputs`). What a folder's listing leaves out is said in one line on stderr; a file
    given by name is always taken (and reported as failed if it is not a readable image).

    Returns (files, the folders given). UserError for a path that does not exist or a folder without image files.
    """
    files, folders = [], []
    suffixes = image_suffixes()
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            folders.append(path)
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            say_left_out(path, sorted(p for p in path.iterdir() if not p.is_file() or p.name.startswith(".")))
            outputs = earlier_outputs(path)
            if outputs:
                found = [p for p in found if p.name not in outputs]
                print(f"dino predict: {path} holds an earlier run's outputs: left out its predictions.json and the "
                      f"{len(outputs) - 1} picture(s) it lists", file=sys.stderr)
            images = [p for p in found if p.suffix.lower() in suffixes]
            others = [p for p in found if p.suffix.lower() not in suffixes]
            if not images:
                raise UserError(f"input folder {path} holds no image files"
                                + (f" (only {len(others)} other file(s))" if others else ""))
            if others:
                shown = ", ".join(p.name for p in others[:5]) + (", ..." if len(others) > 5 else "")
                print(f"dino predict: {path}: left out {len(others)} file(s) that are not images by their name "
                      f"({shown}); name a file to predict on it anyway", file=sys.stderr)
            files.extend(images)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"input {path} {_not_a_file(path) or 'does not exist'}")
    return files, folders


def _not_a_file(path: Path) -> str | None:
    """Why ``path``, which is neither a file nor a folder, is not one: a symlink loop, a symlink to nothing, or
    another kind of entry (a FIFO, a socket, a device); None when there is no entry at all."""
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:  # Python < 3.13 reports a loop so
            return "is a symlink loop"
        except OSError as err:
            if err.errno == errno.ELOOP:
                return "is a symlink loop"
            return f"is a symlink to {os.readlink(path)}, which does not exist"
    if os.path.lexists(path):
        return "is not a file or a folder (a FIFO, socket or device)"
    return None


def say_left_out(folder: Path, entries: list[Path]) -> None:
    """One stderr line for each entry of an input ``folder`` that is not listed because it is not a file (a
    dangling symlink or a symlink loop named like an image, a FIFO), and one for its subfolders (not entered) and
    its hidden entries, naming them (the first 10): nothing in a folder is left out without a word."""
    folders = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    hidden = [p for p in entries if p.name.startswith(".")]
    for p in entries:
        if p not in folders and p not in hidden:
            print(f"dino predict: {folder}: left out {p.name!r}: it {_not_a_file(p) or 'vanished'}", file=sys.stderr)
    for group, what in ((folders, "subfolder(s), not entered (name them to predict on their images)"),
                        (hidden, "hidden entr(ies)")):
        if group:
            shown = ", ".join(repr(p.name) for p in group[:10]) + (", ..." if len(group) > 10 else "")
            print(f"dino predict: {folder}: left out {len(group)} {what}: {shown}", file=sys.stderr)


def check_output_dir(output_dir: str | os.PathLike, files: list[Path], folders: list[Path] = ()) -> Path:
    """``output_dir``, refused (UserError) when writing there could replace an input or feed a later run's inputs:
    when it holds one of ``files``, or is (inside) one of the scanned ``folders``, or is an existing file."""
    output_dir = Path(output_dir)
    out = output_dir.resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {output_dir} is a file, not a folder; give a folder for predictions.json and "
                        "the pictures")
    for path in files:
        if path.resolve().parent == out:
            raise UserError(f"--output {output_dir} holds the input {path}: the pictures could replace the inputs; "
                            "give a folder that holds none of them")
    for folder in folders:
        if out.is_relative_to(folder.resolve()):
            raise UserError(f"--output {output_dir} is inside the input folder {folder}: a later run would read "
                            "predictions.json and the pictures as inputs; give a folder outside it")
    return output_dir


def check_spares_inputs(output_dir: str | os.PathLike, files: list[Path], inputs=()) -> None:
    """UserError when a file ``dino predict`` writes in ``output_dir`` (predictions.json, a picture of
    :func:`picture_names`) would replace one of the files it reads: an image of ``files``, or one of ``inputs`` (the
    checkpoint or artifact, a recipe file, plugin libraries; a folder counts as every file in it), compared by real
    path (symlinks, ``..``, relative paths: :func:`dino.durable.is_one_of`)."""
    read = list(files)
    for given in inputs:
        if given is not None and Path(given).is_dir():
            read.extend(p for p in Path(given).iterdir() if p.is_file())
        elif given is not None:
            read.append(Path(given))
    for name in ("predictions.json", *picture_names(files)):
        given = is_one_of(Path(output_dir) / name, read)
        if given is not None:
            raise UserError(f"--output {output_dir}: its {name} would replace the input {given}; give a folder that "
                            "holds none of the inputs")


def picture_names(files: list[Path]) -> list[str]:
    """One distinct picture name per input (``stem.jpg``, then ``stem_1.jpg`` ...), also when a file is given twice;
    compared case-insensitively so no two pictures collide on a case-insensitive file system either."""
    names, used = [], set()
    for path in files:
        name, n = f"{path.stem}{PICTURE_SUFFIX}", 1
        while name.casefold() in used:
            name, n = f"{path.stem}_{n}{PICTURE_SUFFIX}", n + 1
        used.add(name.casefold())
        names.append(name)
    return names
