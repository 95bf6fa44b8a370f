"""TensorRT path without TensorRT: the build plan from ONNX files, the engine builder's flags on a fake `tensorrt`
shaped like 10.x and like 11.x, the staged engine write, the plugin library lookup, the CLI's errors; where
TensorRT and a GPU exist, a real build checked against ONNX Runtime."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from dino.errors import UserError
from dino_cli import main
from dino_export.plugin_node import PLUGIN_DOMAIN, PLUGIN_NAME
from dino_export.query_check import ExportCheckError
from dino_export.trt_engine import build_engine, make_build_plan


def _write(tmp_path: Path, batch, plugin=False, name="m.onnx", mask_elem=TensorProto.BOOL, half=False) -> Path:
    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, 64, 96])
    mask = helper.make_tensor_value_info("mask", mask_elem, [batch, 64, 96])
    out = helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [batch, 3, 64, 96])
    nodes = [helper.make_node("Identity", ["images"], ["boxes"])]
    opsets = [helper.make_opsetid("", 18)]
    inits = [helper.make_tensor("w", TensorProto.FLOAT16 if half else TensorProto.FLOAT, [1], [1.0])]
    if plugin:
        nodes.append(helper.make_node(PLUGIN_NAME, ["images"], ["extra"], domain=PLUGIN_DOMAIN, plugin_version="1"))
        opsets.append(helper.make_opsetid(PLUGIN_DOMAIN, 1))
    model = helper.make_model(helper.make_graph(nodes, "g", [images, mask], [out], initializer=inits),
                              opset_imports=opsets)
    path = tmp_path / name
    onnx.save(model, path)
    return path


def test_dynamic_batch_gets_a_profile_for_images_and_mask(tmp_path):
    plan = make_build_plan(_write(tmp_path, "batch"), max_batch=6, opt_batch=2, workspace_gb=1.5)
    assert plan.profile == {"images": ((1, 3, 64, 96), (2, 3, 64, 96), (6, 3, 64, 96)),
                            "mask": ((1, 64, 96), (2, 64, 96), (6, 64, 96))}
    assert plan.batch is None and plan.image_size == (64, 96)
    assert plan.workspace_bytes == int(1.5 * (1 << 30))
    assert plan.output == tmp_path / "m.engine"
    assert plan.timing_cache == tmp_path / "m.timing.cache"
    assert not plan.graph_is_fp16 and plan.num_plugin_nodes == 0


def test_static_batch_has_no_profile_and_fp16_graph_is_detected(tmp_path):
    plan = make_build_plan(_write(tmp_path, 1, half=True), output=tmp_path / "x.engine", fp16=True)
    assert plan.profile is None and plan.batch == 1
    assert plan.graph_is_fp16 and plan.fp16_requested


def test_plugin_graph_requires_the_plugin_library(tmp_path):
    path = _write(tmp_path, "batch", plugin=True)
    with pytest.raises(UserError, match="--plugin-lib"):
        make_build_plan(path)
    with pytest.raises(UserError, match="libmissing.so"):
        make_build_plan(path, plugin_libs=[tmp_path / "libmissing.so"])
    lib = tmp_path / "libfake.so"
    lib.write_bytes(b"")
    assert make_build_plan(path, plugin_libs=[lib]).num_plugin_nodes == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"workspace_gb": 0}, "--workspace-gb"),
    ({"max_batch": 0}, "--max-batch"),
    ({"max_batch": 2, "opt_batch": 3}, "optimisation batch"),
])
def test_bad_arguments_name_the_option(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        make_build_plan(_write(tmp_path, "batch"), **kwargs)


def test_missing_and_corrupt_onnx_files(tmp_path):
    with pytest.raises(UserError, match="nothere.onnx does not exist"):
        make_build_plan(tmp_path / "nothere.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(UserError, match="bad.onnx is not a readable ONNX file"):
        make_build_plan(bad)


def test_inputs_must_be_the_deploy_graph_contract(tmp_path):
    inp = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["b", 3, 64, 96])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["images"], ["o"])], "g", [inp],
                                                [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)]))
    onnx.save(model, tmp_path / "maskless.onnx")
    with pytest.raises(UserError, match=r"expected inputs \['images', 'mask'\]"):
        make_build_plan(tmp_path / "maskless.onnx")
    with pytest.raises(UserError, match="input mask must be bool"):
        make_build_plan(_write(tmp_path, "batch", mask_elem=TensorProto.FLOAT, name="floatmask.onnx"))


# --- the builder on a fake `tensorrt` --------------------------------------------------------------------------------

class _Recorder:
    def __init__(self):
        self.calls = []


def fake_tensorrt(version: str, recorder: _Recorder) -> types.ModuleType:
    """A `tensorrt` module with the API surface build_engine uses; 10.x has EXPLICIT_BATCH, STRONGLY_TYPED and
    BuilderFlag.FP16, 11.x has STRONGLY_TYPED only (strongly typed networks, no precision flags)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    major = int(version.split(".")[0])
    creation = {"STRONGLY_TYPED": 5} if major >= 11 else {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 5}
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(**creation)
    trt.BuilderFlag = types.SimpleNamespace(**({} if major >= 11 else {"FP16": 0}), TF32=7)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")

    class Logger:
        VERBOSE, WARNING = "verbose", "warning"

        def __init__(self, level):
            pass

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return b"cache:" + self.data

    class Config:
        def set_memory_pool_limit(self, pool, size):
            recorder.calls.append(("workspace", size))

        def set_flag(self, flag):
            recorder.calls.append(("flag", flag))

        def add_optimization_profile(self, profile):
            recorder.calls.append(("profile", dict(profile.shapes)))

        def create_timing_cache(self, data):
            recorder.calls.append(("cache_in", bytes(data)))
            self.cache = Cache(bytes(data))
            return self.cache

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            recorder.calls.append(("network_flags", flags))
            return "network"

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"ENGINE"

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = 0

        def parse_from_file(self, path):
            recorder.calls.append(("parse", path))
            return True

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    trt.init_libnvinfer_plugins = lambda logger, namespace: True
    return trt


@pytest.fixture()
def fake_trt(monkeypatch):
    def install(version):
        recorder = _Recorder()
        monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version, recorder))
        return recorder

    return install


def _flags(recorder):
    return next(v for k, v in recorder.calls if k == "network_flags")


def test_tensorrt_10_fp32_graph_with_fp16_uses_the_weakly_typed_fp16_flag(tmp_path, fake_trt):
    rec = fake_trt("10.13.0")
    plan = make_build_plan(_write(tmp_path, "batch"), fp16=True, max_batch=4)
    path, notes = build_engine(plan)
    assert _flags(rec) == 1 << 0  # EXPLICIT_BATCH only: weakly typed
    assert ("flag", 0) in rec.calls and "BuilderFlag.FP16 set (weakly typed network)" in notes
    assert path.read_bytes() == b"ENGINE"
    assert ("profile", plan.profile) in rec.calls


def test_tensorrt_10_fp16_graph_is_strongly_typed_without_the_flag(tmp_path, fake_trt):
    rec = fake_trt("10.13.0")
    build_engine(make_build_plan(_write(tmp_path, 1, half=True), fp16=True))
    assert _flags(rec) == (1 << 0) | (1 << 5)
    assert not [c for c in rec.calls if c[0] in ("flag", "profile")]


def test_tensorrt_11_is_strongly_typed_and_says_how_to_get_fp16(tmp_path, fake_trt):
    rec = fake_trt("11.1.0")
    _, notes = build_engine(make_build_plan(_write(tmp_path, "batch"), fp16=True))
    assert _flags(rec) == 1 << 5  # STRONGLY_TYPED, no EXPLICIT_BATCH (gone in 11)
    assert not [c for c in rec.calls if c[0] == "flag"]
    assert any("export the ONNX with --fp16" in n for n in notes)


def test_timing_cache_is_read_and_rewritten(tmp_path, fake_trt):
    rec = fake_trt("11.1.0")
    plan = make_build_plan(_write(tmp_path, "batch"))
    plan.timing_cache.write_bytes(b"old")
    build_engine(plan)
    assert ("cache_in", b"old") in rec.calls
    assert plan.timing_cache.read_bytes() == b"cache:old"


def test_engine_that_fails_its_check_is_not_written(tmp_path, fake_trt):
    fake_trt("11.1.0")
    plan = make_build_plan(_write(tmp_path, "batch"))
    seen = []

    def failing_check(tmp: Path):
        seen.append(tmp.read_bytes())
        raise ExportCheckError("TensorRT disagrees with ONNX Runtime")

    with pytest.raises(ExportCheckError):
        build_engine(plan, check=failing_check)
    assert seen == [b"ENGINE"]  # the check saw the built engine ...
    assert not plan.output.exists()  # ... which was then not moved into place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.timing.cache"]  # no temporary left


def test_missing_tensorrt_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails
    with pytest.raises(UserError, match="TensorRT is not installed: `pip install tensorrt`"):
        build_engine(make_build_plan(_write(tmp_path, "batch")))


# --- the plugin library and the CLI -------------------------------------------------------------------------------

def test_plugin_library_found_in_the_build_folder_or_a_clear_error(tmp_path, monkeypatch):
    from dino_export import trt_export

    lib = tmp_path / "build" / trt_export.PLUGIN_LIB_NAME
    lib.parent.mkdir()
    lib.write_bytes(b"")
    assert trt_export.find_or_build_plugin_library(lib.parent) == lib
    monkeypatch.setattr(trt_export.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="no `cmake` to build it"):
        trt_export.find_or_build_plugin_library(tmp_path / "empty")


def test_plugin_library_build_failure_names_the_log(tmp_path, monkeypatch):
    from dino_export import trt_export

    script = tmp_path / "cmake"
    script.write_text("#!/bin/sh\necho 'TensorRT not found: pass -DTensorRT_ROOT'\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setattr(trt_export.shutil, "which", lambda name: str(script))
    with pytest.raises(UserError, match=r"building libdino_trt_plugin.so failed .*dino_build.log.*TensorRT not found"):
        trt_export.find_or_build_plugin_library(tmp_path / "b", tensorrt_root="/opt/none")


def _cli(argv, capsys):
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_export_trt_cli_errors(tmp_path, capsys, monkeypatch):
    rc, err = _cli(["export", "trt"], capsys)
    assert rc == 2 and "either --onnx FILE or --recipe R --checkpoint C" in err
    rc, err = _cli(["export", "trt", "--recipe", "dino_quickstart"], capsys)
    assert rc == 2 and "--recipe needs --checkpoint" in err
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    rc, err = _cli(["export", "trt", "--recipe", "dino_quickstart", "--checkpoint", str(tmp_path / "c.safetensors")],
                   capsys)
    assert rc == 2 and "TensorRT is not installed" in err  # said before any export work


def test_export_trt_cli_from_onnx_with_fake_tensorrt(tmp_path, capsys, fake_trt):
    fake_trt("10.13.0")
    path = _write(tmp_path, "batch")
    rc = main(["export", "trt", "--onnx", str(path), "--no-verify", "--max-batch", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and (tmp_path / "m.engine").read_bytes() == b"ENGINE"
    assert "not checked against ONNX Runtime (--no-verify)" in out and "wrote" in out and "TensorRT 10.13.0" in out


@pytest.mark.tensorrt
@pytest.mark.cuda
def test_plugin_graph_engine_passes_its_check_against_onnxruntime(tmp_path):
    import dino
    from dino_export.deploy_model import DeployModel
    from dino_export.onnx_export import export_onnx
    from dino_export.trt_export import build_checked_engine, plan_from_args
    from tests.test_export_onnx import SIZE, tiny_config

    torch.manual_seed(0)
    model = DeployModel(dino.build_model(tiny_config()), num_select=20).eval()
    exported = export_onnx(model, tmp_path / "m.onnx", SIZE, "plugin", dynamic_batch=True, max_batch=4)
    plan = plan_from_args(exported.path, tmp_path / "m.engine", False, [], 1.0, 4, None)
    engine, notes = build_checked_engine(plan)
    assert engine.is_file() and any(n.startswith("TensorRT batch 3") for n in notes)
