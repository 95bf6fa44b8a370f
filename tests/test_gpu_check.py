"""scripts/gpu_check.sh --dry-run: every step of the prepared GPU session runs on tiny shapes on the CPU, so that the
day a GPU comes nothing fails on a typo."""
import io
import json
import os
import subprocess
import tarfile
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["kernel build", "CUDA tests", "CUDA bad-input test", "plugin enqueue test", "training step, kernel",
            "training step, PyTorch path", "deployed inference", "kernel table", "precision, kernel",
            "precision, PyTorch path"]


def test_gpu_check_dry_run_runs_every_section(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "DINO_EXT_CACHE": str(tmp_path / "ext")}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--budget", "900"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]

    # At most 8 files come back from a GPU session.
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["summary.md", "gpu_check.log", "tests.log", "train.md", "deploy.md", "kernel.md",
                            "precision.md", "json.tar"]), files
    with tarfile.open(out / "json.tar") as tar:
        tables = {Path(m.name).name: json.load(io.TextIOWrapper(tar.extractfile(m))) for m in tar.getmembers()
                  if m.isfile()}
    assert sorted(tables) == ["deploy.json", "precision.json", "train.json"]
    summary = (out / "summary.md").read_text()
    for name in SECTIONS:
        assert f"| {name} | 0 |" in summary, f"section {name!r} did not finish with exit code 0:\n{summary}"
    assert "torch" in summary and "(dry run)" in summary

    train = tables["train.json"]["rows"]
    assert [(r["precision"], r["path"]) for r in train] == [
        ("fp32", "PyTorch (grid_sample)"), ("bf16", "PyTorch (grid_sample)"), ("fp32", "PyTorch (grid_sample)")]
    assert all(r["images_per_s"] > 0 and r["loss"] > 0 for r in train), train

    deploy = tables["deploy.json"]["rows"]
    backends = [r["backend"] for r in deploy]
    assert backends == ["eager_fp32", "eager_bf16", "aoti_bf16", "compile_bf16_cudagraphs", "compile_bf16"], deploy
    assert all(r.get("fps") for r in deploy), [r for r in deploy if not r.get("fps")]
    fp32 = deploy[0]
    assert fp32["max_box_diff_px"] == 0 and fp32["max_score_diff"] == 0

    # float16 (the --fp16 deploy model) and bf16 against float32 on float32's selection: small, nonzero differences.
    precision = tables["precision.json"]["rows"]
    assert [r["precision"] for r in precision] == ["fp16", "bf16", "fp16", "bf16"], precision
    for row in precision:
        assert 0 < row["query_box_px"] < 1 and 0 < row["query_score"] < 1e-2, row

    kernel = (out / "kernel.md").read_text()
    assert kernel.count("| cpu (dry run) |") == 12  # 3 dtypes x (encoder, decoder) x (forward, forward+backward)
