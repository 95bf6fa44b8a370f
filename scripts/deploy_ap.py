"""The AP column of the CPU table: every CPU deployment of one trained model, evaluated on its validation set.

Each row is exported with ``dino export`` and scored with ``dino eval`` (the same commands a user runs, one process
each), beside eager PyTorch float32 on the checkpoint:

- ``eager``: ``dino eval --checkpoint`` (unpadded images, each at its own size);
- ``onnx``: ``dino export onnx`` (standard graph) -> ``dino eval --onnx`` (ONNX Runtime CPU);
- ``openvino_{f32,bf16,int8}`` and ``openvino_{f32,bf16,int8}_gridsample``: ``dino export openvino --precision P``
  with dino's OpenVINO extension (the project's CPU kernel as the deformable op), and without it
  (``DINO_OPENVINO_EXTENSION=0``: the GridSample IR) -> ``dino eval --openvino``.

Artifacts take a fixed canvas (``--image-size``, default the recipe's validation size), so on non-square images the
letterbox alone moves AP: ``--set data.shapes_val_image_size=64,40`` (the quickstart recipe's shapes data) measures
that. A row the CPU cannot run (bf16 without avx512_bf16/AMX) says so and is not estimated.

    python scripts/deploy_ap.py --checkpoint outputs/quickstart/model.safetensors --out docs/deploy_ap.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRICS = ("AP", "AP50", "AP75")
ROWS = {
    "eager": "ours eager PyTorch f32 (checkpoint, each image at its own size)",
    "onnx": "ONNX Runtime CPU f32, standard graph (GridSample)",
    "openvino_f32": "OpenVINO f32, dino's extension (CPU kernel)",
    "openvino_bf16": "OpenVINO bf16, dino's extension (op in f32)",
    "openvino_int8": "OpenVINO int8 (NNCF), dino's extension",
    "openvino_f32_gridsample": "OpenVINO f32, GridSample IR",
    "openvino_bf16_gridsample": "OpenVINO bf16, GridSample IR",
    "openvino_int8_gridsample": "OpenVINO int8 (NNCF), GridSample IR",
}


def _dino(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dino_cli", *args], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    return result, time.perf_counter() - start


def _last_line(result: subprocess.CompletedProcess) -> str:
    lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
    return lines[-1][:300] if lines else f"exit {result.returncode}"


def _has_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _export_args(row: str, ckpt: Path, args, out: Path) -> tuple[list[str], dict[str, str]]:
    common = ["--recipe", args.recipe, "--checkpoint", str(ckpt), "--output", str(out), *_size(args), *_sets(args)]
    if row == "onnx":
        return ["export", "onnx", *common], {}
    precision = row.split("_")[1]
    extra = ["--precision", precision]
    if precision == "int8":
        extra += ["--calibration-images", str(args.calibration_images), "--max-ap-drop", str(args.max_ap_drop)]
    env = {"DINO_OPENVINO_EXTENSION": "0"} if row.endswith("_gridsample") else {}
    return ["export", "openvino", *common, *extra], env


def _size(args) -> list[str]:
    return ["--image-size", *map(str, args.image_size)] if args.image_size else []


def _sets(args) -> list[str]:
    return ["--set", *args.set] if args.set else []


def measure(row: str, args, work: Path) -> dict:
    record: dict = {"row": row, "what": ROWS[row]}
    if "bf16" in row and not _has_bf16():
        return {**record, "note": "not measured here: this CPU has no bf16 (OpenVINO lists no BF16)"}
    eval_dir = work / f"eval_{row}"
    if row == "eager":
        model_args = ["--checkpoint", str(args.checkpoint)]
    else:
        artifact = work / row / ("model.onnx" if row == "onnx" else "model.xml")
        artifact.parent.mkdir()
        export_args, env = _export_args(row, args.checkpoint, args, artifact)
        result, seconds = _dino(export_args, env)
        record["export_s"] = round(seconds, 1)
        if result.returncode != 0:
            return {**record, "note": f"export failed ({result.returncode}): {_last_line(result)}"}
        notes = [ln for ln in result.stdout.splitlines() + result.stderr.splitlines() if "extension" in ln]
        if notes:
            record["export_note"] = notes[0][:300]
        model_args = ["--onnx" if row == "onnx" else "--openvino", str(artifact)]
    result, seconds = _dino(["eval", "--recipe", args.recipe, *model_args, "--output-dir", str(eval_dir),
                             *_sets(args)])
    record["eval_s"] = round(seconds, 1)
    if result.returncode != 0:
        return {**record, "note": f"eval failed ({result.returncode}): {_last_line(result)}"}
    stats = json.loads((eval_dir / "results.json").read_text())
    return {**record, **{k: stats[k] for k in METRICS}}


def table(records: list[dict]) -> str:
    eager = next((r for r in records if r["row"] == "eager" and "AP" in r), None)
    lines = ["| row | what | AP | AP50 | AP75 | AP - eager | export s | note |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "AP" not in r:
            lines.append(f"| {r['row']} | {r['what']} | - | - | - | - | {r.get('export_s', '-')} | {r.get('note')} |")
            continue
        delta = f"{r['AP'] - eager['AP']:+.4f}" if eager else "-"
        lines.append(f"| {r['row']} | {r['what']} | {r['AP']:.4f} | {r['AP50']:.4f} | {r['AP75']:.4f} | {delta} | "
                     f"{r.get('export_s', '-')} | {r.get('export_note', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=REPO / "outputs" / "quickstart" / "model.safetensors")
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="the artifacts' canvas (default: the recipe's validation size)")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", help="recipe overrides, every step")
    parser.add_argument("--calibration-images", type=int, default=300)
    parser.add_argument("--max-ap-drop", type=float, default=0.01)
    parser.add_argument("--out", type=Path, help="markdown table (and a .json beside it)")
    args = parser.parse_args(argv)
    if not args.checkpoint.exists():
        parser.error(f"--checkpoint {args.checkpoint} does not exist (make quickstart trains one)")
    header = (f"{args.recipe}, {args.checkpoint}, overrides {args.set or 'none'}, canvas "
              f"{args.image_size or 'the recipe validation size'}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in args.rows:
            records.append(measure(row, args, Path(tmp)))
            print(json.dumps(records[-1]), flush=True)
    text = header + "\n\n" + table(records)
    if args.out is not None:
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": records}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
