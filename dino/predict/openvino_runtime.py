"""OpenVINO on the CPU: the precision an IR runs at, compiling it at exactly that precision, running it.

An OpenVINO IR (``model.xml`` + ``model.bin``, written by ``dino export openvino``) stores float32 weights; the
arithmetic precision is a property of the compiled model (``INFERENCE_PRECISION_HINT``). OpenVINO's own default on
the CPU is bf16 wherever the CPU has it (avx512_bf16 or AMX) and f32 elsewhere, so the same file silently gives other
numbers on another machine. Here the precision is explicit: it is recorded in the IR (``rt_info`` key
:data:`PRECISION_KEY`), every compile sets it, and a CPU without it is refused instead of falling back (OpenVINO
itself compiles a bf16 hint to f32 without a word on such CPUs). An ``int8`` IR (``dino export openvino --precision
int8``) holds NNCF's quantise/dequantise nodes, and the rest of its graph runs at bf16 where the CPU has it, else
f32 (:func:`inference_precision`). ``openvino`` is imported only when used.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree

import numpy as np
import torch

from dino.errors import UserError
from dino.ops.openvino_build import OP_NAME, load_openvino_extension, openvino_extension_failure

PRECISIONS = ("f32", "bf16", "int8")
# OPTIMIZATION_CAPABILITIES entry a CPU must list for each precision (f32 is always there).
_CAPABILITY = {"f32": "FP32", "bf16": "BF16", "int8": "INT8"}
PRECISION_KEY = "dino.precision"
# rt_info: the op of dino's OpenVINO extension (dino.ops.openvino_build) that the IR holds; absent when it needs none.
EXTENSION_KEY = "dino.extension"
_extension_core = []  # the one Core holding the extension library (it stays loaded while this process runs)


def openvino():
    """The ``openvino`` module; UserError with the install line when it is missing."""
    try:
        import openvino as ov
    except ImportError:
        raise UserError("OpenVINO is not installed: pip install 'dino[export]' (or openvino)") from None
    return ov


def core():
    return openvino().Core()


def extension_library(source: str | os.PathLike) -> str:
    """The path of dino's OpenVINO extension library (built on first use), also loaded into :func:`extension_core`;
    UserError naming ``source`` (what needs it) and why when it cannot be built here."""
    library = load_openvino_extension()
    if library is None:
        raise UserError(f"{source} needs dino's OpenVINO extension (op {OP_NAME}), which is unavailable here: "
                        f"{openvino_extension_failure()}; build it with python -m dino.ops.openvino_build (a C++ "
                        "compiler and the openvino wheel), or use an IR exported without it")
    if not _extension_core:
        ov_core = core()
        ov_core.add_extension(str(library))
        _extension_core.append(ov_core)
    return str(library)


def extension_core(source: str | os.PathLike):
    """A Core with dino's OpenVINO extension added (:func:`extension_library`), one per process."""
    extension_library(source)
    return _extension_core[0]


def needs_extension(xml: str | os.PathLike) -> bool:
    """Whether the IR file ``xml`` records :data:`EXTENSION_KEY` (read without OpenVINO, which cannot read such an IR
    before the extension is added)."""
    info = ElementTree.parse(str(xml)).getroot().find("rt_info")
    return info is not None and any(child.tag == EXTENSION_KEY for child in info)


def read_ir(xml: str | os.PathLike):
    """The ``openvino.Model`` of the IR ``xml``, read by a Core with dino's extension when the IR records that it needs
    it (UserError, one line, when the extension is unavailable here)."""
    ov_core = extension_core(xml) if needs_extension(xml) else core()
    return ov_core.read_model(str(xml))


def set_extension(model) -> None:
    """Records in ``model``'s rt_info that it holds the extension's op (:data:`EXTENSION_KEY`)."""
    model.set_rt_info(OP_NAME, [EXTENSION_KEY])


def cpu_capabilities() -> list[str]:
    """The CPU plugin's OPTIMIZATION_CAPABILITIES, e.g. ``['FP32', 'INT8', 'BIN', 'EXPORT_IMPORT']`` (no BF16)."""
    return list(core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def check_precision(precision: str) -> None:
    """UserError when ``precision`` is unknown or this CPU cannot compute in it."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    capabilities = cpu_capabilities()
    if _CAPABILITY[precision] not in capabilities:
        needs = "; bf16 needs avx512_bf16 or AMX" if precision == "bf16" else ""
        raise UserError(f"--precision {precision}: this CPU has no {_CAPABILITY[precision]} (OpenVINO CPU "
                        f"capabilities: {', '.join(capabilities)}){needs}. Use --precision f32")


def inference_precision(precision: str) -> str:
    """The INFERENCE_PRECISION_HINT an IR of ``precision`` compiles with: itself for f32 and bf16; for int8, the
    precision of the graph between its quantised nodes, bf16 where this CPU has it (int8 beside bf16 measured
    faster than beside f32, docs/deployment.md "int8"), else f32."""
    if precision != "int8":
        return precision
    return "bf16" if _CAPABILITY["bf16"] in cpu_capabilities() else "f32"


def compile_cpu(model, precision: str, threads: int | None = None):
    """``model`` (an ``openvino.Model``) compiled for the CPU at ``precision`` with the LATENCY hint (one stream,
    for one request at a time) and ``threads`` inference threads (None: OpenVINO's default, every core).

    Raises UserError when this CPU lacks the precision, and RuntimeError when OpenVINO compiled another one.
    """
    check_precision(precision)
    hint = inference_precision(precision)
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = core().compile_model(model, "CPU", config)
    got = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # an openvino.Type, e.g. 'f32'
    if got != hint:
        raise RuntimeError(f"OpenVINO compiled the model at {got}, not the requested {hint}")
    return compiled


def run_compiled(compiled, images: torch.Tensor, mask: torch.Tensor, names: list[str] | tuple[str, ...]
                 ) -> list[np.ndarray]:
    """The outputs ``names`` of ``compiled`` on ``images (B, 3, H, W)`` float32 and ``mask (B, H, W)`` bool."""
    feeds = {"images": images.detach().cpu().float().numpy(),
             "mask": mask.detach().cpu().numpy().astype(np.bool_)}
    result = compiled(feeds)
    return [result[compiled.output(name)] for name in names]


def set_precision(model, precision: str) -> None:
    model.set_rt_info(precision, [PRECISION_KEY])


def recorded_precision(model, source: str | os.PathLike) -> str:
    """The precision recorded in an IR; UserError naming ``source`` when it has none or an unknown one."""
    if not model.has_rt_info([PRECISION_KEY]):
        raise UserError(f"{source} records no {PRECISION_KEY}: not an IR written by dino export openvino "
                        "(re-export it)")
    precision = model.get_rt_info([PRECISION_KEY]).astype(str)
    if precision not in PRECISIONS:
        raise UserError(f"{source}: unknown {PRECISION_KEY} {precision!r} (expected one of {', '.join(PRECISIONS)})")
    return precision


def set_metadata(model, metadata: dict[str, str]) -> None:
    """Stores string ``metadata`` (e.g. the class labels of :func:`dino.predict.labels.label_metadata`) in the IR's
    rt_info."""
    for key, value in metadata.items():
        model.set_rt_info(value, [key])


def read_metadata(model, keys: tuple[str, ...]) -> dict[str, str]:
    """The IR's rt_info values of ``keys`` that it has, as strings."""
    return {key: model.get_rt_info([key]).astype(str) for key in keys if model.has_rt_info([key])}
