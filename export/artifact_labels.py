"""The classes an exported artifact was made for, stored with it so ``dino predict`` can name its labels and refuse
a recipe of another class count (:mod:`dino.predict.labels` defines the keys and values, all strings, and reads them
back).

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

from dino.model_loading import read_categories
from dino.predict.labels import LABEL_KEYS, engine_sidecar, label_metadata
from dino_export import files


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


def write_engine_sidecar(engine: str | os.PathLike, labels: dict[str, str]) -> Path | None:
    """Writes the sidecar of ``engine`` (atomically); None and nothing written when there are no labels."""
    if not labels:
        return None
    return files.write_bytes((json.dumps(labels, indent=1) + "\n").encode(), engine_sidecar(engine))
