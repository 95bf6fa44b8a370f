"""TensorRT engines from exported ONNX files, for TensorRT 10.x and 11.x, checked against ONNX Runtime.

Differences handled by feature detection rather than version numbers:

- TensorRT 11 networks are always strongly typed and ``BuilderFlag.FP16`` is gone: precision comes from the ONNX
  graph (``dino export onnx --fp16``). On 10.x the network is created strongly typed too when the flag exists, so
  both versions build the graph's own precision; ``--fp16`` on 10.x with a float32 graph uses a weakly typed
  network and sets ``BuilderFlag.FP16``.
- ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH`` is deprecated (10.x) / removed (11.x): set only where it exists.
- Plugin libraries: ours registers its creators from a static initializer, so loading it (``ctypes.CDLL``, or
  ``trtexec --staticPlugins``, or ONNX Runtime's ``trt_extra_plugin_lib_paths``) is enough; the built-in plugins
  come from ``init_libnvinfer_plugins``.

The plan (profile shapes, flags, files) is computed by :func:`make_build_plan`, which needs no TensorRT;
:func:`build_engine` applies it with the ``tensorrt`` module, writes the engine to a temporary file, runs the
caller's check on it and only then moves it into place.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import onnx

from dino.errors import UserError
from dino.predict.backend import INPUT_NAMES
from dino.predict.tensorrt_runtime import import_tensorrt, load_plugin_libraries
from dino_export import files
from dino_export.plugin_node import plugin_nodes


@dataclasses.dataclass
class BuildPlan:
    """Everything the builder needs, derived from the ONNX file and the command line."""

    onnx_path: Path
    output: Path
    timing_cache: Path
    image_size: tuple[int, int]
    # Optimisation profile per input name: (min, opt, max) shapes; None when the batch is static.
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] | None
    batch: int | None  # the static batch, None when dynamic
    max_batch: int
    fp16_requested: bool
    graph_is_fp16: bool
    workspace_bytes: int
    plugin_libs: list[Path]
    num_plugin_nodes: int


def _dims(value_info: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def _graph_is_fp16(model: onnx.ModelProto) -> bool:
    return any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute)
        for n in model.graph.node)


def make_build_plan(
    onnx_path: str | os.PathLike,
    output: str | os.PathLike | None = None,
    fp16: bool = False,
    plugin_libs: list[str | os.PathLike] | None = None,
    workspace_gb: float = 4.0,
    max_batch: int = 8,
    opt_batch: int = 1,
    timing_cache: str | os.PathLike | None = None,
) -> BuildPlan:
    """Reads the ONNX file's inputs and plugin nodes and validates the arguments.

    Raises UserError for a missing ONNX file or plugin library, a graph with plugin nodes but no ``--plugin-lib``,
    a non-positive ``--workspace-gb``/``--max-batch``, or inputs that are not ``images (B, 3, H, W)`` float and
    ``mask (B, H, W)`` bool (the deploy-graph contract).
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"ONNX file {onnx_path} does not exist")
    if workspace_gb <= 0:
        raise UserError(f"--workspace-gb must be positive, got {workspace_gb}")
    if max_batch < 1:
        raise UserError(f"--max-batch must be >= 1, got {max_batch}")
    if not 1 <= opt_batch <= max_batch:
        raise UserError(f"the optimisation batch {opt_batch} must lie in 1..--max-batch ({max_batch})")
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError and friends: a corrupt file
        raise UserError(f"{onnx_path} is not a readable ONNX file: {str(err).splitlines()[0][:200]}") from None
    inputs = {i.name: i for i in model.graph.input}
    if sorted(inputs) != sorted(INPUT_NAMES):
        raise UserError(f"{onnx_path}: expected inputs {list(INPUT_NAMES)} (the deploy graph of `dino export onnx`), "
                        f"found {list(inputs)}")
    images, mask = _dims(inputs["images"]), _dims(inputs["mask"])
    if len(images) != 4 or images[1] != 3 or None in images[2:]:
        raise UserError(f"{onnx_path}: input images must be (B, 3, H, W) with static H and W, got {images}")
    if len(mask) != 3 or mask[1:] != images[2:] or inputs["mask"].type.tensor_type.elem_type != onnx.TensorProto.BOOL:
        raise UserError(f"{onnx_path}: input mask must be bool (B, {images[2]}, {images[3]}), got {mask}")
    _, c, h, w = images
    if images[0] is not None:
        profile, batch = None, images[0]
    else:
        batch = None
        profile = {"images": ((1, c, h, w), (opt_batch, c, h, w), (max_batch, c, h, w)),
                   "mask": ((1, h, w), (opt_batch, h, w), (max_batch, h, w))}
    n_plugin = len(plugin_nodes(model))
    libs = [Path(p) for p in (plugin_libs or [])]
    for lib in libs:
        if not lib.is_file():
            raise UserError(f"plugin library {lib} does not exist (build csrc/tensorrt with CMake, docs/deployment.md)")
    if n_plugin and not libs:
        raise UserError(
            f"{onnx_path} has {n_plugin} DinoMSDeformAttn plugin node(s): pass --plugin-lib "
            "path/to/libdino_trt_plugin.so (see docs/deployment.md)"
        )
    out = Path(output) if output is not None else onnx_path.with_suffix(".engine")
    cache = Path(timing_cache) if timing_cache is not None else out.with_suffix(".timing.cache")
    return BuildPlan(onnx_path, out, cache, (h, w), profile, batch, batch or max_batch, fp16, _graph_is_fp16(model),
                     int(workspace_gb * (1 << 30)), libs, n_plugin)


def network_flags(trt, weak_fp16: bool) -> tuple[int, list[str]]:
    """Network creation flags by feature detection: EXPLICIT_BATCH where it exists, STRONGLY_TYPED unless a weakly
    typed FP16 build was asked for. Returns (flags, notes)."""
    creation = trt.NetworkDefinitionCreationFlag
    flags, notes = 0, []
    if hasattr(creation, "EXPLICIT_BATCH"):  # deprecated in 10.x (always explicit), gone in 11.x
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    if hasattr(creation, "STRONGLY_TYPED") and not weak_fp16:
        flags |= 1 << int(creation.STRONGLY_TYPED)
        notes.append("strongly typed network: precision from the ONNX graph")
    return flags, notes


def build_engine(plan: BuildPlan, verbose: bool = False,
                 check: Callable[[Path], list[str]] | None = None) -> tuple[Path, list[str]]:
    """Builds the serialized engine, updates the timing cache, runs ``check(temporary engine path)`` (which raises
    on failure and returns lines to print), then moves the engine into place. Returns (path, notes).

    Raises UserError when ``tensorrt`` is missing and RuntimeError with the parser's errors when parsing fails.
    """
    trt = import_tensorrt()
    notes = [f"TensorRT {trt.__version__}"]
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    load_plugin_libraries(plan.plugin_libs)
    notes += [f"loaded plugin library {lib}" for lib in plan.plugin_libs]

    builder = trt.Builder(logger)
    has_fp16_flag = hasattr(trt.BuilderFlag, "FP16")
    # On 10.x an fp32 graph with --fp16 uses the weakly typed network and the FP16 builder flag.
    weak_fp16 = plan.fp16_requested and not plan.graph_is_fp16 and has_fp16_flag
    flags, more = network_flags(trt, weak_fp16)
    notes += more
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {plan.onnx_path}: " + "; ".join(errors))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    if plan.fp16_requested and not plan.graph_is_fp16:
        if weak_fp16:
            config.set_flag(trt.BuilderFlag.FP16)
            notes.append("BuilderFlag.FP16 set (weakly typed network)")
        else:
            notes.append("this TensorRT has no FP16 builder flag: export the ONNX with --fp16 for a half engine")
    if plan.profile is not None:
        profile = builder.create_optimization_profile()
        for name, shapes in plan.profile.items():
            profile.set_shape(name, *shapes)
        config.add_optimization_profile(profile)

    cache_bytes = plan.timing_cache.read_bytes() if plan.timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=True)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {plan.onnx_path} (run with --verbose)")
    files.write_bytes(bytes(config.get_timing_cache().serialize()), plan.timing_cache)
    notes.append(f"timing cache {plan.timing_cache}")
    with files.staged(plan.output) as tmp:
        tmp.write_bytes(bytes(serialized))
        if check is not None:
            notes += check(tmp)
        files.commit(tmp, plan.output)
    return plan.output, notes
