"""Which backend runs an exported artifact: its kind, from the caller (``dino predict``'s ``--onnx`` / ``--aoti`` /
``--engine``) or from the file's suffix (``dino.Detector.load``), and the backend of that kind
(:mod:`dino_export.predict_backends`). A new kind of artifact is one more row of :data:`KINDS` and one more branch of
:func:`open_artifact`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch

from dino.errors import UserError
from dino_export.predict_backends import AotiBackend, OnnxRuntimeBackend, OpenVinoBackend, TensorRTBackend


class ArtifactKind(NamedTuple):
    name: str  # as in `kind=` and the dino predict flag (--onnx)
    what: str  # in words, for messages and predictions.json's "model"
    suffixes: tuple[str, ...]  # recognised by Detector.load, lower case


KINDS = (
    ArtifactKind("onnx", "ONNX graph", (".onnx",)),
    ArtifactKind("openvino", "OpenVINO IR", (".xml",)),
    ArtifactKind("aoti", "AOTInductor package", (".pt2",)),
    ArtifactKind("engine", "TensorRT engine", (".engine", ".plan", ".trt")),
)


def artifact_kind(path: str | os.PathLike, kind: str | None = None) -> ArtifactKind:
    """The kind named ``kind``, or the kind of ``path`` by its suffix; UserError naming what is recognised."""
    path = Path(path)
    for known in KINDS:
        if known.name == kind or (kind is None and path.suffix.lower() in known.suffixes):
            return known
    recognised = "; ".join(f"{k.what} ({', '.join(k.suffixes)})" for k in KINDS)
    if kind is not None:
        raise UserError(f"{path}: unknown artifact kind {kind!r}; known: {', '.join(k.name for k in KINDS)}")
    raise UserError(f"{path}: not a file dino can run: give model.safetensors, an official .pth, a training run or "
                    f"checkpoint folder, or an exported artifact: {recognised}")


def open_artifact(path: str | os.PathLike, device: str | torch.device = "cpu", kind: str | None = None,
                  plugin_libs: list[str | os.PathLike] = (), image_size: tuple[int, int] | None = None):
    """``(backend, description)``: the backend running the exported artifact ``path`` (:mod:`dino.predict.backend`'s
    interface) on ``device`` (an OpenVINO IR runs on the CPU whatever it says), and the artifact in words
    (``"ONNX graph model.onnx"``). ``plugin_libs`` go with a TensorRT engine,
    ``image_size`` (H, W) with an AOTInductor package that does not record it. UserError (one line) for a file that
    is not an artifact of a known kind, or that its runtime cannot load."""
    found = artifact_kind(path, kind)
    if plugin_libs and found.name != "engine":
        raise UserError("TensorRT plugin libraries (--plugin-lib) go with a TensorRT engine")
    if image_size is not None and found.name != "aoti":
        raise UserError("--image-size goes with --aoti (ONNX graphs, OpenVINO IRs and engines record their size)")
    described = f"{found.what} {path}"
    if found.name == "onnx":
        return OnnxRuntimeBackend(path, device), described
    if found.name == "openvino":
        backend = OpenVinoBackend(path)
        return backend, f"{described} ({backend.precision})"
    if found.name == "aoti":
        return AotiBackend(path, image_size, device), described
    return TensorRTBackend(path, list(plugin_libs), device), described
