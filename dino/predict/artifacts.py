"""Exported artifacts as :mod:`dino.predict` backends: ONNX graphs (ONNX Runtime), OpenVINO IRs, AOTInductor
packages and TensorRT engines; which kind a file is (by flag or suffix); and :func:`open_artifact`, the one entry
``dino.Detector.load`` and ``dino predict`` use.

Each backend implements the interface of :mod:`dino.predict.backend` on the deploy-graph contract
(docs/ARCHITECTURE.md, CONTRACTS item 4): ``run(images (B,3,H,W) float32, mask (B,H,W) bool) -> boxes (B,K,4) xyxy
pixels of each image's valid region, scores (B,K), labels (B,K) int64``, plus ``device``, ``input_size`` (the graph's
fixed (H, W), or None) and ``max_batch`` (a static batch axis, or None). ONNX Runtime, OpenVINO and TensorRT are
imported only when used. ``labels`` is the artifact's recorded classes (:class:`dino.predict.labels.ArtifactLabels`),
or None for an artifact exported before they were recorded.

The runtimes live here, not in ``dino_export``, because ``dino/`` never imports ``dino_export``: exporting writes these
files, running them is prediction. A new kind of artifact is one more row of :data:`KINDS`, one more backend class
and one more branch of :func:`open_artifact`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from dino.errors import UserError
from dino.predict.backend import INPUT_NAMES, OUTPUT_NAMES
from dino.predict.labels import LABEL_KEYS, read_engine_sidecar, read_label_metadata
from dino.predict.openvino_runtime import compile_cpu, read_ir, read_metadata, recorded_precision, run_compiled
from dino.predict.tensorrt_runtime import TensorRTRunner

# AOTInductor package metadata key of the image size ("H,W") the package was compiled for (dino export aoti writes it).
IMAGE_SIZE_KEY = "dino.image_size"


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


def _existing(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    return path


def _static(dim) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


class OnnxRuntimeBackend:
    """An exported ONNX graph (standard deform op) in ONNX Runtime, on the CPU or (``device="cuda"``) the GPU."""

    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        path = _existing(path, "ONNX graph")
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("--onnx needs ONNX Runtime: pip install 'dino[export]' (or onnxruntime)") from None
        self.device = torch.device(device)
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UserError("--device cuda: this ONNX Runtime has no CUDAExecutionProvider (install "
                                "onnxruntime-gpu)")
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as err:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph/... types for bad files
            raise UserError(f"ONNX Runtime cannot load {path}: {str(err).splitlines()[0]}") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        if set(inputs) != set(INPUT_NAMES):
            raise UserError(f"{path} takes inputs {sorted(inputs)}; dino predict needs a graph taking "
                            f"{list(INPUT_NAMES)} (re-export it with this version of dino export onnx)")
        shape = inputs["images"].shape
        height, width = _static(shape[2]), _static(shape[3])
        if height is None or width is None:
            raise UserError(f"{path}: the graph's image size {shape[2:]} is not fixed")
        self.input_size = (height, width)
        self.max_batch = _static(shape[0])
        self._outputs = [o.name for o in self.session.get_outputs()]
        self.labels = read_label_metadata(self.session.get_modelmeta().custom_metadata_map, str(path))

    def run(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feed = {"images": images.detach().float().cpu().numpy(), "mask": mask.detach().cpu().numpy().astype(np.bool_)}
        values = dict(zip(self._outputs, self.session.run(self._outputs, feed)))
        names = OUTPUT_NAMES if set(OUTPUT_NAMES) <= set(values) else self._outputs[:3]
        return tuple(torch.from_numpy(values[n]) for n in names)  # type: ignore[return-value]


class OpenVinoBackend:
    """An OpenVINO IR (``dino export openvino``) on the CPU, compiled at the precision recorded in it (f32 or bf16;
    refused on a CPU without it) with the LATENCY hint and ``threads`` inference threads (None: every core)."""

    name = "openvino"

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        path = _existing(path, "OpenVINO IR")
        if path.suffix != ".xml":
            raise UserError(f"--openvino {path}: give the IR's .xml file (its weights are read from the .bin beside "
                            "it)")
        try:
            model = read_ir(path)  # with dino's OpenVINO extension when the IR records it
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - OpenVINO raises RuntimeError with a long log for bad files
            raise UserError(f"OpenVINO cannot read {path}: {str(err).strip().splitlines()[-1][:300]}") from None
        self.precision = recorded_precision(model, path)
        self.device = torch.device("cpu")
        inputs = {i.get_any_name(): i for i in model.inputs}
        if set(inputs) != set(INPUT_NAMES):
            raise UserError(f"{path} takes inputs {sorted(inputs)}; dino predict needs an IR taking "
                            f"{list(INPUT_NAMES)}")
        shape = inputs["images"].get_partial_shape()
        if shape[2].is_dynamic or shape[3].is_dynamic:
            raise UserError(f"{path}: the IR's image size {shape} is not fixed")
        self.input_size = (shape[2].get_length(), shape[3].get_length())
        self.max_batch = None if shape[0].is_dynamic else shape[0].get_length()
        self.labels = read_label_metadata(read_metadata(model, LABEL_KEYS), str(path))
        self.compiled = compile_cpu(model, self.precision, threads)

    def run(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        boxes, scores, labels = run_compiled(self.compiled, images, mask, OUTPUT_NAMES)
        return torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels)


class AotiBackend:
    """An AOTInductor package (``dino export aoti``), compiled for one image size on one device.

    The size is read from the package metadata; ``input_size`` is needed only for packages that do not record it.
    """

    name = "aoti"
    max_batch = None  # the package's batch range is not recorded in it; --batch-size must stay within it

    def __init__(self, path: str | os.PathLike, input_size: tuple[int, int] | None, device: str | torch.device):
        path = _existing(path, "AOTInductor package")
        self.device = torch.device(device)
        try:
            self.runner = torch._inductor.aoti_load_package(str(path))
        except Exception as err:  # noqa: BLE001 - a corrupt archive surfaces as many error types
            raise UserError(f"cannot load the AOTInductor package {path}: {str(err).splitlines()[0]}") from None
        meta = dict(self.runner.get_metadata())
        recorded = tuple(int(v) for v in meta[IMAGE_SIZE_KEY].split(",")) if IMAGE_SIZE_KEY in meta else None
        if input_size is not None and recorded is not None and tuple(input_size) != recorded:
            raise UserError(f"--image-size {' '.join(map(str, input_size))} differs from the size {path} was exported "
                            f"for ({recorded[0]} {recorded[1]}): omit --image-size")
        if input_size is None and recorded is None:
            raise UserError(f"--aoti {path} does not record its image size: pass --image-size H W, the size it was "
                            "exported for")
        self.input_size = tuple(input_size) if input_size is not None else recorded
        self.labels = read_label_metadata(meta, str(path))

    @torch.no_grad()
    def run(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        boxes, scores, labels, *_per_query = self.runner(images.float(), mask)
        return boxes, scores, labels


class TensorRTBackend:
    """A TensorRT engine (``dino export trt``), with the plugin libraries a plugin graph needs; CUDA only."""

    name = "tensorrt"

    def __init__(self, path: str | os.PathLike, plugin_libs: list[str | os.PathLike], device: str | torch.device):
        path = _existing(path, "TensorRT engine")
        try:
            import tensorrt  # noqa: F401 - only to fail early with a clear line
        except ImportError:
            raise UserError("--engine needs TensorRT: the `tensorrt` Python package is not installed "
                            "(pip install tensorrt, on a machine with an NVIDIA GPU)") from None
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise UserError("--engine runs on a CUDA GPU: pass --device cuda on a machine with one")
        self.runner = TensorRTRunner(path, list(plugin_libs))
        shape = tuple(self.runner.engine.get_tensor_shape("images"))
        if _static(shape[2]) is None or _static(shape[3]) is None:
            raise UserError(f"{path}: the engine's image size {shape[2:]} is not fixed")
        self.input_size = (shape[2], shape[3])
        self.max_batch = _static(shape[0])
        self.labels = read_engine_sidecar(path)

    @torch.no_grad()
    def run(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        boxes, scores, labels, *_per_query = self.runner(images.float(), mask)
        return boxes, scores, labels.long()


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
                  plugin_libs: list[str | os.PathLike] = (), image_size: tuple[int, int] | None = None,
                  threads: int | None = None):
    """``(backend, description)``: the backend running the exported artifact ``path`` (:mod:`dino.predict.backend`'s
    interface) on ``device`` (an OpenVINO IR runs on the CPU whatever it says), and the artifact in words
    (``"ONNX graph model.onnx"``). ``plugin_libs`` go with a TensorRT engine,
    ``image_size`` (H, W) with an AOTInductor package that does not record it, ``threads`` (None: every core) with an
    OpenVINO IR. UserError (one line) for a file that
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
        backend = OpenVinoBackend(path, threads)
        return backend, f"{described} ({backend.precision})"
    if found.name == "aoti":
        return AotiBackend(path, image_size, device), described
    return TensorRTBackend(path, list(plugin_libs), device), described
