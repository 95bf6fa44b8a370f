"""TensorRT engine building from an exported ONNX file, for TensorRT 10.x and 11.x.

Differences handled by feature detection rather than version numbers:

- TensorRT 11 networks are always strongly typed and ``BuilderFlag.FP16`` is gone: precision comes from the ONNX
  graph (``dino export onnx --fp16``). On 10.x the network is created strongly typed too when the flag exists, so
  both versions build the graph's own precision; ``--fp16`` on 10.x without strong typing sets ``BuilderFlag.FP16``.
- ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH`` is deprecated (10.x) / removed (11.x): set only where it exists.
- Plugin libraries: ours registers its creators from a static initializer, so loading it (``ctypes.CDLL``, or
  ``trtexec --staticPlugins``, or ONNX Runtime's ``trt_extra_plugin_lib_paths``) is enough; the built-in plugins
  come from ``init_libnvinfer_plugins``.

The plan (profile shapes, flags, files) is computed by :func:`make_build_plan`, which needs no TensorRT, so it is
unit-tested here; :func:`build_engine` applies it with the ``tensorrt`` module.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import onnx

from dino.errors import UserError
from export.plugin_node import plugin_nodes


@dataclasses.dataclass
class BuildPlan:
    """Everything the builder needs, derived from the ONNX file and the command line."""

    onnx_path: Path
    output: Path
    timing_cache: Path
    input_name: str
    # Optimisation profile of the images input: (min, opt, max) shapes, None when the batch is static.
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None
    static_shape: tuple[int, ...] | None
    fp16_requested: bool
    graph_is_fp16: bool
    workspace_bytes: int
    plugin_libs: list[Path]
    num_plugin_nodes: int


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
    """Reads the ONNX file's input and plugin nodes and validates the arguments.

    Raises FileNotFoundError for a missing ONNX file or plugin library, and ValueError for a graph with plugin nodes
    but no ``--plugin-lib``, a non-positive ``--workspace-gb``/``--max-batch``, or an input that is not (B, 3, H, W).
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
    model = onnx.load(str(onnx_path), load_external_data=False)
    if len(model.graph.input) != 1:
        raise ValueError(f"{onnx_path}: expected one input (images), found {[i.name for i in model.graph.input]}")
    inp = model.graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    if len(dims) != 4 or not all(d.HasField("dim_value") for d in dims[1:]) or dims[1].dim_value != 3:
        raise ValueError(f"{onnx_path}: input {inp.name} must be (B, 3, H, W) with static H and W")
    _, c, h, w = (d.dim_value for d in dims)
    if dims[0].HasField("dim_value"):
        profile, static_shape = None, (dims[0].dim_value, c, h, w)
    else:
        profile, static_shape = ((1, c, h, w), (opt_batch, c, h, w), (max_batch, c, h, w)), None
    n_plugin = len(plugin_nodes(model))
    libs = [Path(p) for p in (plugin_libs or [])]
    for lib in libs:
        if not lib.is_file():
            raise UserError(f"plugin library {lib} does not exist (build csrc/tensorrt with CMake)")
    if n_plugin and not libs:
        raise UserError(
            f"{onnx_path} has {n_plugin} DinoMSDeformAttn plugin node(s): pass --plugin-lib "
            "path/to/libdino_trt_plugin.so (see docs/deployment.md)"
        )
    graph_fp16 = inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute)
        for n in model.graph.node
    )
    out = Path(output) if output is not None else onnx_path.with_suffix(".engine")
    cache = Path(timing_cache) if timing_cache is not None else out.with_suffix(".timing.cache")
    return BuildPlan(onnx_path, out, cache, inp.name, profile, static_shape, fp16, graph_fp16,
                     int(workspace_gb * (1 << 30)), libs, n_plugin)


def _write_atomically(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_plugin_libraries(libs: list[Path]) -> None:
    """dlopens each library globally; its static initializer registers the plugin creators with TensorRT."""
    import ctypes

    for lib in libs:
        ctypes.CDLL(str(Path(lib).resolve()), mode=ctypes.RTLD_GLOBAL)


def build_engine(plan: BuildPlan, verbose: bool = False) -> tuple[Path, list[str]]:
    """Builds and writes the serialized engine (atomically) and updates the timing cache. Returns (path, notes).

    Raises ImportError when ``tensorrt`` is missing and RuntimeError with the parser's errors when parsing fails.
    """
    try:
        import tensorrt as trt
    except ImportError as err:
        raise ImportError("the `tensorrt` Python package is not installed (pip install tensorrt)") from err

    notes = [f"TensorRT {trt.__version__}"]
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    load_plugin_libraries(plan.plugin_libs)
    notes += [f"loaded plugin library {lib}" for lib in plan.plugin_libs]

    builder = trt.Builder(logger)
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if hasattr(creation, "EXPLICIT_BATCH"):  # deprecated in 10.x (always explicit), gone in 11.x
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    has_fp16_flag = hasattr(trt.BuilderFlag, "FP16")
    # Strongly typed: the graph's own types decide precision (the only mode on 11.x). On 10.x an fp32 graph with
    # --fp16 instead uses the weakly typed network and the FP16 builder flag.
    weak_fp16 = plan.fp16_requested and not plan.graph_is_fp16 and has_fp16_flag
    if hasattr(creation, "STRONGLY_TYPED") and not weak_fp16:
        flags |= 1 << int(creation.STRONGLY_TYPED)
        notes.append("strongly typed network: precision from the ONNX graph")
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
        profile.set_shape(plan.input_name, *plan.profile)
        config.add_optimization_profile(profile)

    cache_bytes = plan.timing_cache.read_bytes() if plan.timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=True)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {plan.onnx_path} (run with --verbose)")
    _write_atomically(bytes(serialized), plan.output)
    _write_atomically(bytes(config.get_timing_cache().serialize()), plan.timing_cache)
    notes.append(f"timing cache {plan.timing_cache}")
    return plan.output, notes
