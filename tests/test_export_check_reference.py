"""The export check on trained weights: GroupNorm exported so ONNX Runtime computes it as well as PyTorch, the check
judged against PyTorch float64 (``dino_export.check_reference``), the canvas taken from the recipe, and a failed check
as one line with exit status 1."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import dino
from dino.engine.recipe import load_recipe
from dino.weights import save_weights
from dino_cli import main
from dino_export import onnx_export
from dino_export.check_reference import FACTOR, FLOOR, Referee, float64_affordable
from dino_export.deploy_model import DeployModel
from dino_export.group_norm import StagedGroupNorm, staged_group_norms
from dino_export.tracing import check_inputs

TINY = str(Path(__file__).resolve().parent / "engine_tiny_recipe.py")


def _onnx_run(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    proto = torch.onnx.export(module.eval(), (x,), dynamo=True, opset_version=18, optimize=True,
                              verbose=False).model_proto
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_staged_group_norm_in_onnx_runtime_is_about_as_close_to_float64_as_pytorch():
    """GroupNorm groups of many cells (an input projection at a large canvas: 4 channels x 100 x 167 cells): PyTorch's
    own export (InstanceNormalization) sums each group in one long float32 reduction in ONNX Runtime and lands far
    from float64; the staged form does not."""
    torch.manual_seed(0)
    norm = nn.GroupNorm(32, 128).eval()
    with torch.no_grad():
        norm.weight.uniform_(-8, 8)  # trained input projections have gains of this order
    x = torch.randn(1, 128, 100, 167) * 0.3 + torch.linspace(-1, 1, 128).view(1, 128, 1, 1)
    with torch.no_grad():
        truth = norm.double()(x.double()).numpy()
        norm.float()
        eager = np.abs(norm(x).numpy() - truth).max()
        raw = np.abs(_onnx_run(norm, x) - truth).max()
        with staged_group_norms(norm):
            assert type(norm) is StagedGroupNorm
            staged = np.abs(_onnx_run(norm, x) - truth).max()
        assert type(norm) is nn.GroupNorm  # restored
    print(f"|ONNX Runtime - float64|: InstanceNormalization {raw:.3g}, staged {staged:.3g}; PyTorch float32 {eager:.3g}")
    # Measured: InstanceNormalization 3.2e-5, staged 5.7e-6, PyTorch float32 3.1e-6.
    assert raw > 5 * eager  # the defect the staged form fixes
    assert staged < 3 * eager, (staged, eager)


def _tiny_checkpoint(tmp_path: Path) -> Path:
    cfg = load_recipe(TINY, [f"data.root={tmp_path / 'shapes'}"])
    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_weights(dino.build_model(cfg.model).state_dict(), path)
    return path


def _export_args(tmp_path: Path, checkpoint: Path, output: Path, *extra: str) -> list[str]:
    # The recipe's evaluation size moved off its 64 px, so the default canvas can only come from the recipe.
    return ["export", "onnx", "--recipe", TINY, "--checkpoint", str(checkpoint), "--output", str(output),
            "--set", f"data.root={tmp_path / 'shapes'}", "data.val_scale=48", "data.val_max_size=80", *extra]


def test_default_canvas_is_the_recipe_s_evaluation_size_and_the_check_is_judged_against_float64(tmp_path, capsys):
    checkpoint = _tiny_checkpoint(tmp_path)
    output = tmp_path / "model.onnx"
    assert main(_export_args(tmp_path, checkpoint, output)) == 0
    out = capsys.readouterr().out
    assert "canvas 48x80: recipe engine_tiny's evaluation size (data.val_scale 48, data.val_max_size 80)" in out
    dims = [d.dim_value for d in onnx.load(str(output)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 48, 80]
    check_line = next(line for line in out.splitlines() if line.startswith("ONNX Runtime CPU batch 1: "))
    assert "judged against PyTorch float64, from which PyTorch float32 is" in check_line


def test_failed_check_is_one_line_exit_1_and_writes_nothing(tmp_path, capsys, monkeypatch):
    checkpoint = _tiny_checkpoint(tmp_path)
    output = tmp_path / "model.onnx"
    real = onnx_export.run_session

    def moved_boxes(session, images, mask):  # a graph whose every box is off by 0.05 of the image
        out = real(session, images, mask)
        out[4] = out[4] + 0.05
        return out

    monkeypatch.setattr(onnx_export, "run_session", moved_boxes)
    assert main(_export_args(tmp_path, checkpoint, output)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    # The per-query boxes moved and the graph's own detections did not (measured: both 4.5 px).
    assert re.match(r"dino export onnx: error: the exported graph disagrees with PyTorch: largest difference: "
                    r"(per-query|detection) box 4.5 px at image 0, ", err[0]), err[0]
    assert err[0].endswith("against PyTorch float64); nothing was written (--no-verify writes it unchecked)")
    assert not output.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_tolerance_scales_with_pytorch_float32_s_own_distance_from_float64():
    cfg = load_recipe(TINY).model
    torch.manual_seed(0)
    model = DeployModel(dino.build_model(cfg), num_select=cfg.num_select).eval()
    images, mask = check_inputs(1, (64, 96), seed=101)
    judge = Referee(model, (64, 96)).judge(images, mask)
    assert judge.reference.dtype == torch.float64
    with torch.no_grad():
        eager, truth = model.run(images, mask), judge.reference.run(images, mask)
    assert torch.equal(eager.query_indices, truth.query_indices)
    score = (eager.pred_logits.double().sigmoid() - truth.pred_logits.sigmoid()).abs().max().item()
    assert judge.tolerance.score == pytest.approx(FACTOR * score + FLOOR.score, rel=1e-6)
    assert 0 < score < 1e-5  # float32 rounding, not a different computation
    # The fixed float32 check where float64 costs too much, said in the line.
    assert float64_affordable(model, (64, 96)) and not float64_affordable(model, (20000, 20000))
    fixed = Referee(model, (64, 96), reference="float32").judge(images, mask)
    assert fixed.reference is model and "fixed float32 tolerance" in fixed.basis


def test_a_trained_model_exported_larger_than_it_trained_passes_against_float64(tmp_path, capsys):
    """A few training steps at 64 px, exported at 256x384: the check runs against float64 and passes. (The trained
    quickstart model that failed the float32 check at 800x1333 takes minutes to train; the defect behind it, GroupNorm
    in ONNX Runtime, is the first test's.)"""
    root = [f"data.root={tmp_path / 'shapes'}"]
    assert main(["train", TINY, "--set", *root, f"train.output_dir={tmp_path / 'run'}",
                 "train.checkpoint_every_steps=0"]) == 0
    capsys.readouterr()
    output = tmp_path / "model.onnx"
    assert main(["export", "onnx", "--recipe", TINY, "--checkpoint", str(tmp_path / "run"), "--output", str(output),
                 "--image-size", "256", "384", "--set", *root]) == 0
    out = capsys.readouterr().out
    check_line = next(line for line in out.splitlines() if line.startswith("ONNX Runtime CPU batch 1: "))
    assert "judged against PyTorch float64" in check_line and output.is_file()
    score = float(re.search(r"per query: max \|score\| diff ([0-9.e+-]+)", check_line).group(1))
    eager = float(re.search(r"PyTorch float32 is ([0-9.e+-]+) in score", check_line).group(1))
    assert score <= FACTOR * eager + FLOOR.score
