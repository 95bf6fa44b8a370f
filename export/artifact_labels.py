"""The classes an exported artifact was made for, stored with it so ``dino predict`` can name its labels and refuse
a recipe of another class count (:mod:`dino.predict.labels` defines the keys and values, all strings).

- ONNX graph: ``metadata_props`` of the model (visible in Netron and ``onnxruntime``'s ``custom_metadata_map``).
- AOTInductor package: the package metadata (``aot_inductor.metadata``, read back with ``runner.get_metadata()``).
- TensorRT engine: a serialised engine has no room for user metadata, so a sidecar JSON file next to it,
  ``<engine>.json``, copied from the ONNX graph the engine was built from.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import onnx

from dino.errors import UserError
from dino.model_loading import read_categories
from dino.predict.labels import CATEGORIES_KEY, NUM_CLASSES_KEY, ArtifactLabels, label_metadata, read_label_metadata
from dino_export import files

LABEL_KEYS = (NUM_CLASSES_KEY, CATEGORIES_KEY)


def model_labels(num_classes: int, checkpoint: str | os.PathLike | None) -> dict[str, str]:
    """The metadata of a model with ``num_classes`` class slots and, when the checkpoint stores them, its categories."""
    return label_metadata(num_classes, read_categories(checkpoint) if checkpoint is not None else None)


def set_onnx_labels(proto: onnx.ModelProto, labels: dict[str, str]) -> None:
    """Stores ``labels`` in ``proto.metadata_props`` (replacing earlier values of the same keys)."""
    keep = [p for p in proto.metadata_props if p.key not in labels]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in labels.items():
        proto.metadata_props.add(key=key, value=value)


def onnx_labels(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props if p.key in LABEL_KEYS}


def engine_sidecar(engine: str | os.PathLike) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def write_engine_sidecar(engine: str | os.PathLike, labels: dict[str, str]) -> Path | None:
    """Writes the sidecar of ``engine`` (atomically); None and nothing written when there are no labels."""
    if not labels:
        return None
    return files.write_bytes((json.dumps(labels, indent=1) + "\n").encode(), engine_sidecar(engine))


def read_engine_sidecar(engine: str | os.PathLike) -> ArtifactLabels | None:
    """The labels in the sidecar of ``engine``, or None when it has none; UserError when it is malformed."""
    path = engine_sidecar(engine)
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not the JSON sidecar of a TensorRT engine ({err}); delete or re-export it") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: not the JSON sidecar of a TensorRT engine (not an object); delete or re-export it")
    return read_label_metadata({str(k): str(v) for k, v in meta.items()}, str(path))
