"""`dino export` / `dino bench` on the command line: clear errors on bad input, a bench table with every CPU backend."""
from __future__ import annotations

import json
import os
import stat
import textwrap

import onnx
import pytest
import torch

import dino
from dino.predict.openvino_runtime import cpu_capabilities
from dino.weights import save_weights
from dino_cli import main
from dino_export.bench import format_table, run_bench
from dino_export.deploy_model import DeployModel, check_image_size
from tests.export_standin import StandInDetector


@pytest.fixture()
def quick_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    save_weights(dino.build_model("dino_quickstart").state_dict(), path)
    return path


def _run(argv, capsys):
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_missing_checkpoint(capsys, tmp_path):
    rc, _, err = _run(["export", "onnx", "--recipe", "dino_quickstart", "--checkpoint", str(tmp_path / "no.safetensors"),
                       "--image-size", "128", "128"], capsys)
    assert rc == 2 and "no.safetensors does not exist" in err


def test_unknown_recipe_lists_recipes_and_presets(capsys, tmp_path):
    rc, _, err = _run(["export", "aoti", "--recipe", "nope", "--checkpoint", "x"], capsys)
    assert rc == 2 and "'nope'" in err and "dino_quickstart" in err


def test_checkpoint_of_another_recipe_is_rejected(capsys, quick_checkpoint):
    rc, _, err = _run(["export", "onnx", "--recipe", "dino_r50_4scale", "--checkpoint", str(quick_checkpoint),
                       "--image-size", "128", "128"], capsys)
    assert rc == 2 and "does not match preset dino_r50_4scale" in err


@pytest.mark.parametrize("size, message", [(["0", "128"], "must be positive"), (["128", "-5"], "must be positive"),
                                           (["8", "8"], "6 encoder tokens, fewer than its 30 queries")])
def test_bad_image_size(capsys, quick_checkpoint, size, message):
    rc, _, err = _run(["export", "onnx", "--recipe", "dino_quickstart", "--checkpoint", str(quick_checkpoint),
                       "--image-size", *size], capsys)
    assert rc == 2 and message in err


def test_check_image_size_accepts_non_multiples_of_32():
    assert check_image_size([800, 1333]) == (800, 1333)


def test_trt_export_of_missing_onnx(capsys, tmp_path):
    rc, _, err = _run(["export", "trt", "--onnx", str(tmp_path / "m.onnx")], capsys)
    assert rc == 2 and "m.onnx does not exist" in err


def test_bench_rejects_unknown_backend_and_bad_batch():
    model = DeployModel(StandInDetector())
    with pytest.raises(ValueError, match="unknown backend"):
        run_bench(model, (64, 64), [1], ["tensorflow"], progress=False)
    with pytest.raises(ValueError, match="--batch"):
        run_bench(model, (64, 64), [0], ["eager_fp32"], progress=False)


def test_bench_on_cpu_times_eager_aoti_onnxruntime_and_openvino(tmp_path):
    torch.manual_seed(0)
    model = DeployModel(StandInDetector(), num_select=20)
    rows = run_bench(model, (64, 96), [1], ["eager_fp32", "eager_bf16", "aoti", "ort_cpu", "openvino_cpu",
                                            "openvino_cpu_bf16", "tensorrt"],
                     device="cpu", warmup=1, iters=3, progress=False)
    timed = {r.backend: r for r in rows if r.unavailable is None}
    bf16 = "BF16" in cpu_capabilities()
    assert set(timed) == {"eager_fp32", "aoti", "ort_cpu", "openvino_cpu"} | ({"openvino_cpu_bf16"} if bf16 else set())
    bf16_row = timed.pop("openvino_cpu_bf16", None)  # bfloat16 arithmetic: its own error, below float32's bound
    # Backends returning per-query outputs are compared query by query on their own selection: eager float32
    # against itself is exact.
    assert timed["eager_fp32"].max_box_diff_px == 0 and timed["eager_fp32"].max_score_diff == 0
    for row in timed.values():
        assert row.median_ms > 0 and row.p90_ms >= row.median_ms and row.fps > 0
        assert row.max_box_diff_px < 0.1 and row.max_score_diff < 1e-4
    missing = {r.backend: r.unavailable for r in rows if r.unavailable is not None}
    assert "CUDA" in missing["eager_bf16"] and "tensorrt" in missing["tensorrt"].lower()
    if bf16:
        assert 0 < bf16_row.max_score_diff < 0.05
    else:  # refused, not silently run in float32 as OpenVINO would
        assert "this CPU has no BF16" in missing["openvino_cpu_bf16"]
    table = format_table(rows, "header line")
    for name in ("eager_fp32", "aoti", "ort_cpu", "openvino_cpu", "unavailable:", "median ms"):
        assert name in table


@pytest.fixture()
def tiny_recipe(tmp_path):
    recipe = tmp_path / "tiny.py"
    recipe.write_text(textwrap.dedent("""
        from dino.config import Recipe
        from dino.presets import get_preset

        def recipe():
            model = get_preset("dino_quickstart")
            model.transformer.enc_layers, model.transformer.dec_layers, model.transformer.num_queries = 1, 1, 20
            model.num_select = 10
            return Recipe(name="tiny", model=model)
    """))
    return recipe


def test_export_onnx_cli_reports_the_check_then_success(tmp_path, capsys, tiny_recipe):
    from dino.engine.recipe import load_recipe

    checkpoint = tmp_path / "model.safetensors"
    model_cfg = load_recipe(str(tiny_recipe)).model
    categories = [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}]
    save_weights(dino.build_model(model_cfg).state_dict(), checkpoint, {"categories": json.dumps(categories)})
    output = tmp_path / "out" / "plugin.onnx"
    rc, out, _ = _run(["export", "onnx", "--recipe", str(tiny_recipe), "--checkpoint", str(checkpoint),
                       "--deform-op", "plugin", "--image-size", "96", "96", "--output", str(output)], capsys)
    assert rc == 0 and output.is_file()
    check_line = next(line for line in out.splitlines() if line.startswith("ONNX Runtime CPU batch 1: "))
    assert "query selection" in check_line and "per query: max |score| diff" in check_line
    assert out.index(check_line) < out.index("wrote")
    assert "2 DinoMSDeformAttn plugin nodes" in out and "onnx.checker passed; checked against PyTorch" in out
    assert [p.name for p in output.parent.iterdir()] == ["plugin.onnx"]  # no temporary file left
    # The graph records the classes for `dino predict --onnx`, and has a new file's permissions (was 0600).
    meta = {p.key: p.value for p in onnx.load(str(output), load_external_data=False).metadata_props}
    assert meta == {"dino.num_classes": str(model_cfg.num_classes), "dino.categories": json.dumps(categories)}
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(output.stat().st_mode) == 0o666 & ~umask


def test_bench_cli_writes_table_and_json(tmp_path, capsys, tiny_recipe):
    recipe = tiny_recipe
    out_json = tmp_path / "bench.json"
    rc, out, _ = _run(["bench", "--recipe", str(recipe), "--image-size", "96", "96", "--backends", "eager_fp32",
                       "ort_cuda", "--iters", "2", "--warmup", "0", "--device", "cpu", "--json", str(out_json)], capsys)
    assert rc == 0
    assert "random weights" in out and "eager_fp32" in out and "ort_cuda" in out and "with mask" in out
    data = json.loads(out_json.read_text())
    assert data["meta"]["image_size"] == [96, 96]
    assert [r["backend"] for r in data["rows"]] == ["eager_fp32", "ort_cuda"]
    assert data["rows"][0]["median_ms"] > 0 and data["rows"][1]["unavailable"]


def test_bench_exits_2_naming_each_reason_when_no_requested_backend_can_run(tmp_path, capsys, tiny_recipe):
    """Issue 35 item 14: a bench that measured nothing is a failure (exit 2, one line with every reason), not 0."""
    out_json = tmp_path / "bench.json"
    rc, out, err = _run(["bench", "--recipe", str(tiny_recipe), "--image-size", "96", "96", "--backends", "tensorrt",
                         "eager_fp16", "--device", "cpu", "--json", str(out_json)], capsys)
    assert rc == 2 and "unavailable:" in out
    assert err.splitlines()[-1].startswith("dino bench: error: none of the requested backends can run here: "
                                           "tensorrt: ")
    assert "; eager_fp16: reduced-precision eager is benchmarked on CUDA only" in err.splitlines()[-1]
    assert [r["backend"] for r in json.loads(out_json.read_text())["rows"]] == ["tensorrt", "eager_fp16"]
