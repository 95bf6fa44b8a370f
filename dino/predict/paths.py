"""Which files ``dino predict`` reads and where it may write: inputs listed from files and folders (an earlier run's
outputs left out), an output folder refused when it could replace or feed an input, one distinct picture name per
input."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from dino.errors import UserError

PICTURE_SUFFIX = ".jpg"


def earlier_outputs(folder: Path) -> set[str]:
    """Names of an earlier ``dino predict``'s outputs in ``folder``: its predictions.json and the pictures it lists
    (empty when the folder holds no predictions.json of this format)."""
    try:
        result = json.loads((folder / "predictions.json").read_text())
        pictures = {r["picture"] for r in result["images"] if r.get("picture")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {"predictions.json", *(str(p) for p in pictures)}


def list_inputs(inputs: list[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """Files to predict on: the given files, and every non-hidden file of the given folders (sorted, not recursive),
    except an earlier ``dino predict``'s outputs there (:func:`earlier_outputs`, left out with a line on stderr).

    Returns (files, the folders given). UserError for a path that does not exist or an empty folder.
    """
    files, folders = [], []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            folders.append(path)
            found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            outputs = earlier_outputs(path)
            if outputs:
                found = [p for p in found if p.name not in outputs]
                print(f"dino predict: {path} holds an earlier run's outputs: left out its predictions.json and the "
                      f"{len(outputs) - 1} picture(s) it lists", file=sys.stderr)
            if not found:
                raise UserError(f"input folder {path} holds no files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"input {path} does not exist")
    return files, folders


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
