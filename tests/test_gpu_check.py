"""scripts/gpu_check.sh --dry-run: every step of the prepared GPU session runs on tiny shapes on the CPU, so that the
day a GPU comes nothing fails on a typo.

The official IDEA-Research/DINO code is a peer in the training and deployment tables when a checkout is named by
``DINO_OFFICIAL_ROOT`` (never in CI: there its rows must say they were skipped); the test with the checkout skips
without that variable."""
import io
import json
import os
import subprocess
import tarfile
import sys
from pathlib import Path

import pytest

import dino.ops

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from bench_rows import RowWriter, official_speedups  # noqa: E402 - scripts/ is not a package

# The dry run's deploy backends: compile_fp16_cudagraphs and compile_bf16 are left out, their dry-run code is that of
# compile_fp16_cudagraphs_cl (less the layout flag) and compile_bf16_cudagraphs (aot_eager, no CUDA graph).
DRY_BACKENDS = ["eager_fp32", "compile_fp16_cudagraphs_cl", "cudagraph_fp16", "aoti_fp16_static", "eager_bf16",
                "compile_bf16_cudagraphs", "aoti_bf16"]
SECTIONS = ["kernel build", "official peer", "CUDA tests", "CUDA bad-input test", "plugin enqueue test",
            "training step, kernel", "training step, PyTorch path", "deployed inference", "kernel table",
            "precision, kernel", "precision, PyTorch path"]


def test_gpu_check_dry_run_runs_every_section(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "DINO_OFFICIAL_ROOT"}  # as in CI: no official checkout
    env.update(OUT=str(out), PYTHON=sys.executable, DINO_EXT_CACHE=str(tmp_path / "ext"),
               DEPLOY_ARGS="--backends " + " ".join(DRY_BACKENDS))
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

    # Without a checkout the official rows are one note per table, first.
    skipped = "official rows skipped: DINO_OFFICIAL_ROOT is not set"
    train = tables["train.json"]["rows"]
    assert train[0]["code"] == "official" and train[0]["note"].startswith(skipped), train[0]
    deploy = tables["deploy.json"]["rows"]
    assert deploy[0]["backend"] == "official" and deploy[0]["note"].startswith(skipped), deploy[0]
    assert skipped in (out / "train.md").read_text() and skipped in (out / "deploy.md").read_text()
    train, deploy = train[1:], deploy[1:]

    assert all(r["code"] == "ours" for r in train), train
    # Each row names the path that ran: the CPU kernel for fp32 where it builds (it did here: a C++ compiler), the
    # PyTorch path for bf16 values and under DINO_DISABLE_KERNEL=1 (the third row).
    assert [(r["precision"], r["path"]) for r in train] == [
        ("fp32", dino.ops.path_name("cpu")), ("bf16", "PyTorch (grid_sample)"), ("fp32", "PyTorch (grid_sample)")]
    assert all(r["images_per_s"] > 0 and r["loss"] > 0 for r in train), train

    backends = [r["backend"] for r in deploy]
    assert backends == DRY_BACKENDS, deploy
    assert all(r.get("fps") for r in deploy), [r for r in deploy if not r.get("fps")]
    fp32 = deploy[0]
    assert fp32["max_box_diff_px"] == 0 and fp32["max_score_diff"] == 0
    # The fp16 candidates against eager fp16 on the same weights and layout: the same computation, no difference.
    for row in deploy:
        if "fp16" in row["backend"]:
            assert row["max_box_diff_px"] == 0 and row["max_score_diff"] == 0, row
            assert "x_official_original" not in row, row

    # float16 (the --fp16 deploy model) and bf16 against float32 on float32's selection: small, nonzero differences.
    precision = tables["precision.json"]["rows"]
    assert [r["precision"] for r in precision] == ["fp16", "bf16", "fp16", "bf16"], precision
    for row in precision:
        assert 0 < row["query_box_px"] < 1 and 0 < row["query_score"] < 1e-2, row

    kernel = (out / "kernel.md").read_text()
    assert kernel.count("| cpu (dry run) |") == 12  # 3 dtypes x (encoder, decoder) x (forward, forward+backward)


def test_official_speedups_divide_by_the_official_row_of_the_same_batch(tmp_path):
    rows = [{"backend": "official_eager_fp32 (original kernel)", "batch": 1, "fps": 20.0},
            {"backend": "official_eager_fp32 (PyTorch path)", "batch": 1, "fps": 10.0},
            {"backend": "eager_fp32", "batch": 1, "fps": 30.0},
            {"backend": "eager_fp32", "batch": 8, "fps": 50.0},
            {"backend": "aoti_bf16", "note": "setup failed"}]
    official_speedups(rows)
    assert rows[2]["x_official_original"] == 1.5 and rows[2]["x_official_pytorch"] == 3.0
    assert "x_official_original" not in rows[3] and "x_official_original" not in rows[4]

    # A second writer appending to the table keeps the first one's rows and header, and fills the speed-ups.
    json_path, table = tmp_path / "deploy.json", tmp_path / "deploy.md"
    columns = [("backend", "backend"), ("fps", "FPS"), ("x_official_original", "x official")]
    RowWriter(json_path, table, columns, {"code": "official"}).add(rows[0])
    RowWriter(json_path, table, columns, {"code": "ours"}, append=True, derive=official_speedups).add(rows[2])
    assert [r["backend"] for r in json.loads(json_path.read_text())["rows"]] == [rows[0]["backend"], "eager_fp32"]
    text = table.read_text()
    assert text.startswith("code ours\n\nearlier rows: code official\n") and "| eager_fp32 | 30.00 | 1.50 |" in text


@pytest.mark.skipif(not os.environ.get("DINO_OFFICIAL_ROOT"),
                    reason="needs an IDEA-Research/DINO checkout named by DINO_OFFICIAL_ROOT (docs/benchmarks.md)")
def test_gpu_check_dry_run_puts_official_rows_beside_ours(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "DINO_EXT_CACHE": str(tmp_path / "ext"),
           "GPU_CHECK_SECTIONS": "official deploy", "DEPLOY_ARGS": "--backends eager_fp32"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--budget", "600"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    with tarfile.open(out / "json.tar") as tar:
        tables = {Path(m.name).name: json.load(io.TextIOWrapper(tar.extractfile(m))) for m in tar.getmembers()
                  if m.isfile()}

    # Training: one step of the official model, criterion and optimizer per deformable-attention route.
    train = tables["train.json"]["rows"]
    assert [r["path"] for r in train] == ["official code, original kernel design (csrc/bench re-creation, fp32)",
                                          "official code, PyTorch path (ms_deform_attn_core_pytorch)"], train
    assert all(r["code"].startswith("official @ ") and r["images_per_s"] > 0 and r["loss"] > 0 for r in train)
    # Same init, same batch, same targets: the two routes start from the same loss.
    assert abs(train[0]["loss"] - train[1]["loss"]) < 1e-4 * train[0]["loss"], train

    # Deployment: the official rows, then ours with its speed-up over each.
    deploy = tables["deploy.json"]["rows"]
    assert [r["backend"] for r in deploy] == ["official_eager_fp32 (original kernel)",
                                              "official_eager_fp32 (PyTorch path)", "eager_fp32"], deploy
    for row in deploy[:2]:  # against our model holding the converted official weights: float32 rounding only
        assert row["fps"] > 0 and row["max_box_diff_px"] < 1e-3 and row["max_score_diff"] < 1e-5, row
    ours = deploy[2]
    assert ours["x_official_original"] == pytest.approx(ours["fps"] / deploy[0]["fps"])
    assert ours["x_official_pytorch"] == pytest.approx(ours["fps"] / deploy[1]["fps"])
    table = (out / "deploy.md").read_text()
    assert "x official (orig. kernel)" in table and "| official_eager_fp32 (PyTorch path) |" in table
