"""The CPU table of docs/benchmarks.md: the official code and every CPU way of running ours, side by side in one run.

Rows (R50 4-scale, one 800x1333 image, batch 1, fp32 unless named, torch's thread count):

- ``official``: the official IDEA-Research/DINO model + its PostProcess, eager (its pure-PyTorch deformable attention,
  ``ms_deform_attn_core_pytorch``), built from ``$DINO_OFFICIAL_ROOT`` by scripts/official_code.py; glibc's malloc
  defaults (what a user of the official code gets);
- ``eager_kernel`` / ``eager_pytorch``: ours eager (``dino_export.deploy_model.DeployModel``: model + top-K
  post-processing) with the CPU kernel, and on the PyTorch path (``dino.ops.use_pytorch_path()``), with the
  allocator defaults of the ``dino`` command (dino_cli/allocator.py);
- ``eager_kernel_glibc``: ours eager with the kernel under glibc's malloc defaults (``DINO_MALLOC_TUNING=0``):
  beside ``eager_kernel`` it is the allocator's effect;
- ``ort_cpu``: the ``dino bench`` backend of that name (the exported standard ONNX graph in ONNX Runtime), in one
  process with the ``dino`` allocator defaults;
- ``openvino_cpu``, ``openvino_cpu_bf16``: the same standard graph as an OpenVINO IR (GridSample), compiled as the
  ``dino bench`` backends of those names compile it;
- ``openvino_cpu_int8``: the GridSample IR quantised by NNCF (as ``dino export openvino --precision int8``, on
  :data:`INT8_CALIBRATION` random images: a speed row);
- ``openvino_ext``, ``openvino_ext_bf16``, ``openvino_ext_int8``: the plugin ONNX graph converted with dino's OpenVINO
  extension (deformable attention as its ``DinoMSDeformAttn`` op, the CPU kernel; what ``dino export openvino`` writes
  where the extension builds), f32 / bf16 / int8, in the same process.

Each row lives in a worker process (four: official, ours, ours without the allocator defaults, deploy) that builds
its model once; the parent then asks the rows for one call each in turn, a warm-up round and ``--iters`` timed rounds, so every
row sees the same machine load (the medians are same-run and alternated). Weights are random (seeded); the timing
does not depend on them. Then ``--train-epochs`` of the quickstart recipe with ``dino train`` (its log.jsonl
images/s), kernel on and off alternated, ``--train-repeats`` times each.

    DINO_OFFICIAL_ROOT=$PWD/.official-dino python scripts/cpu_table.py --out /tmp/cpu_table.md
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK = "CPU_TABLE "  # prefix of the protocol lines a worker prints (libraries may print other lines)
ROWS = {
    "official": ("official", "official IDEA-Research/DINO, eager (its PyTorch deformable attention), glibc malloc"),
    "eager_kernel": ("ours", "ours eager, CPU kernel, dino's allocator defaults"),
    "eager_pytorch": ("ours", "ours eager, PyTorch path (grid_sample), dino's allocator defaults"),
    "eager_kernel_glibc": ("ours_glibc", "ours eager, CPU kernel, glibc malloc defaults (DINO_MALLOC_TUNING=0)"),
    "ort_cpu": ("deploy", "ONNX Runtime CPU, exported standard ONNX graph (dino bench ort_cpu)"),
    "openvino_cpu": ("deploy", "OpenVINO CPU f32, the same ONNX graph: GridSample IR (as dino bench openvino_cpu)"),
    "openvino_cpu_bf16": ("deploy", "OpenVINO CPU bf16, GridSample IR (as dino bench openvino_cpu_bf16)"),
    "openvino_cpu_int8": ("deploy", "OpenVINO CPU int8 (NNCF, TRANSFORMER, rest at bf16 where the CPU has it), "
                                    "GridSample IR"),
    "openvino_ext": ("deploy", "OpenVINO CPU f32 + dino's extension (plugin graph: deformable attention on the CPU "
                               "kernel, as dino export openvino writes it)"),
    "openvino_ext_bf16": ("deploy", "OpenVINO CPU bf16 + dino's extension"),
    "openvino_ext_int8": ("deploy", "OpenVINO CPU int8 (NNCF) + dino's extension"),
}
# int8 rows time the quantised graph; NNCF calibrates on this many random images (speed, not accuracy: the AP of
# each deployment is scripts/deploy_ap.py's, on a trained model).
INT8_CALIBRATION = 2


# ---------------------------------------------------------------------------------------------------------- worker
def _say(**msg) -> None:
    print(MARK + json.dumps(msg), flush=True)


def _inputs(height: int, width: int):
    import torch

    gen = torch.Generator().manual_seed(1)
    return torch.randn(1, 3, height, width, generator=gen), torch.zeros(1, height, width, dtype=torch.bool)


def _official_runners(args) -> dict:
    import torch

    import official_code
    from official_peer import OfficialDetector, build_official, peer_config

    root = Path(os.environ.get("DINO_OFFICIAL_ROOT", ""))
    if not (root / "models" / "dino" / "dino.py").is_file():
        raise RuntimeError(f"DINO_OFFICIAL_ROOT={str(root)!r} is not an IDEA-Research/DINO checkout")
    official = official_code.load(root)
    cfg = peer_config(args.preset, False)
    model, _, post = build_official(official, official_code.official_args(root, cfg, "resnet50", "cpu"),
                                    torch.device("cpu"))
    official_code.route("pytorch")
    return {"official": OfficialDetector(model, post["bbox"], official.NestedTensor)}


def _openvino_runner(model, args, workdir: Path, graph: str, precision: str):
    """The ``graph`` ONNX graph (``standard``: GridSample; ``plugin``: converted with dino's OpenVINO extension, the CPU
    kernel, as ``dino export openvino`` writes it where the extension builds) as an OpenVINO IR compiled at
    ``precision`` (int8: NNCF-quantised first) with torch's threads and the per-query outputs, as the dino bench
    OpenVINO rows."""
    import torch

    from dino.predict.backend import OUTPUT_NAMES
    from dino.predict.openvino_runtime import EXTENSION_KEY, check_precision, compile_cpu, run_compiled
    from dino_export.bench import _Unavailable
    from dino_export.onnx_export import export_onnx
    from dino_export.openvino_export import checkable_model, convert_onnx
    from dino_export.openvino_int8 import quantize
    from dino_export.tracing import check_inputs

    try:
        check_precision(precision)
    except Exception as err:  # noqa: BLE001 - a precision this CPU lacks is a row saying so, not a figure
        raise _Unavailable(f"not measured here: {err}") from None
    path = workdir / f"{graph}.onnx"
    if not path.exists():
        export_onnx(model, path, tuple(args.image_size), graph, verify=False)
    ir = convert_onnx(path)
    if graph == "plugin" and not ir.has_rt_info([EXTENSION_KEY]):
        raise _Unavailable("dino's OpenVINO extension is unavailable (python -m dino.ops.openvino_build says why)")
    if precision == "int8":
        samples = [dict(zip(("images", "mask"), (t.numpy() for t in check_inputs(1, tuple(args.image_size), seed))))
                   for seed in range(INT8_CALIBRATION)]
        ir = quantize(ir, samples, onnx_path=path)
    if args.benchmark_app:  # the IR as compiled here, for OpenVINO's own benchmark_app (main)
        from dino.predict.openvino_runtime import openvino, set_precision

        set_precision(ir, precision)
        openvino().save_model(ir, str(Path(args.benchmark_app) / f"{graph}_{precision}.xml"), compress_to_fp16=False)
    compiled = compile_cpu(checkable_model(ir), precision, torch.get_num_threads())
    return lambda images, mask: run_compiled(compiled, images, mask, OUTPUT_NAMES)


def _our_runners(args, names: list[str], workdir: Path) -> dict:
    import torch

    import dino
    from bench_rows import model_config
    from dino.ops import use_pytorch_path
    from dino_export.bench import _Backends, _Unavailable
    from dino_export.deploy_model import DeployModel

    torch.manual_seed(0)
    cfg = model_config(args.preset, tiny=False)
    model = DeployModel(dino.build_model(cfg), cfg.num_select).eval()
    factory = _Backends(model, torch.device("cpu"), tuple(args.image_size), 1, workdir, [])

    def pytorch_path(images, mask):
        with use_pytorch_path():
            return model(images, mask)

    runners = {}
    for name in names:
        try:
            if name.startswith("openvino_"):
                precision = next((p for p in ("bf16", "int8") if name.endswith(p)), "f32")
                graph = "plugin" if name.startswith("openvino_ext") else "standard"
                runners[name] = _openvino_runner(model, args, workdir, graph, precision)
                continue
            runners[name] = {"eager_kernel": model, "eager_kernel_glibc": model,
                             "eager_pytorch": pytorch_path}.get(name) or factory.make(name)
        except _Unavailable as why:
            runners[name] = f"unavailable: {why}"
        except Exception as err:  # noqa: BLE001 - a failing backend is a row saying why
            runners[name] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    return runners


def worker(kind: str, names: list[str], args) -> int:
    """Builds the runners of ``names``, says ready, then runs one call per ``run NAME`` line on stdin."""
    if kind != "official" and kind != "ours_glibc":
        from dino_cli import allocator

        allocator.tune_malloc()  # as the dino command starts
    import torch

    images, mask = _inputs(*args.image_size)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        runners = _official_runners(args) if kind == "official" else _our_runners(args, names, Path(tmp))
        _say(ready=True, setup_s=time.perf_counter() - start,
             notes={n: r for n, r in runners.items() if isinstance(r, str)})
        with torch.inference_mode():
            for line in sys.stdin:
                command, _, name = line.strip().partition(" ")
                if command != "run":
                    break
                t0 = time.perf_counter()
                runners[name](images, mask)
                _say(name=name, ms=(time.perf_counter() - t0) * 1e3)
    return 0


# ---------------------------------------------------------------------------------------------------------- parent
class Worker:
    def __init__(self, kind: str, names: list[str], args, env: dict[str, str]):
        cmd = [sys.executable, __file__, "--worker", kind, "--rows", *names, "--preset", args.preset,
               "--image-size", *map(str, args.image_size)]
        if args.benchmark_app:
            cmd += ["--benchmark-app", str(args.benchmark_app)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
                                     env={**os.environ, **env})

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise RuntimeError(f"worker exited with status {self.proc.wait()} (see its stderr above)")

    def run(self, name: str) -> float:
        self.proc.stdin.write(f"run {name}\n")
        self.proc.stdin.flush()
        return self.read()["ms"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def inference_rows(args, save) -> tuple[list[dict], str]:
    kinds: dict[str, list[str]] = {}
    for name in args.rows:
        kinds.setdefault(ROWS[name][0], []).append(name)
    env = {"official": {"DINO_MALLOC_TUNING": "0"}, "ours": {}, "ours_glibc": {"DINO_MALLOC_TUNING": "0"},
           "deploy": {}}
    times: dict[str, list[float]] = {n: [] for n in args.rows}
    notes: dict[str, str] = {}
    workers: dict[str, Worker] = {}
    try:
        for kind, names in kinds.items():  # one at a time: setups (the ONNX export) do not overlap
            workers[kind] = Worker(kind, names, args, env[kind])
            try:
                ready = workers[kind].read()
            except RuntimeError as err:  # a worker that cannot start: its rows say why, the others still run
                notes.update({n: f"setup failed: {err}" for n in names})
                continue
            notes.update(ready["notes"])
            print(f"{kind}: ready after {ready['setup_s']:.0f} s {ready['notes'] or ''}", flush=True)
        live = [n for n in args.rows if n not in notes]
        for rnd in range(args.warmup + args.iters):
            for name in live:
                ms = workers[ROWS[name][0]].run(name)
                if rnd >= args.warmup:
                    times[name].append(ms)
                print(f"round {rnd}{' (warm-up)' if rnd < args.warmup else ''}: {name} {ms / 1e3:.2f} s", flush=True)
            if rnd >= args.warmup:
                save(*_table(args, times, notes))
    finally:
        for w in workers.values():
            w.close()
    return _table(args, times, notes)


def _table(args, times: dict[str, list[float]], notes: dict[str, str]) -> tuple[list[dict], str]:
    rows = [{"row": n, "what": ROWS[n][1], "times_s": [t / 1e3 for t in times[n]],
             "median_s": statistics.median(times[n]) / 1e3 if times[n] else None, "note": notes.get(n)}
            for n in args.rows]
    official = next((r["median_s"] for r in rows if r["row"] == "official" and r["median_s"]), None)
    lines = ["| row | what | median s per image | calls (s) | vs official |", "|---|---|---|---|---|"]
    for r in rows:
        if r["median_s"] is None:
            lines.append(f"| {r['row']} | {r['what']} | - | - | {r['note']} |")
            continue
        ratio = f"{r['median_s'] / official:.2f}x" if official else "-"
        calls = ", ".join(f"{t:.2f}" for t in r["times_s"])
        lines.append(f"| {r['row']} | {r['what']} | {r['median_s']:.2f} | {calls} | {ratio} |")
    return rows, "\n".join(lines)


def benchmark_app_rows(args) -> str:
    """OpenVINO's own ``benchmark_app`` on each IR the deploy worker saved (``-hint none -nstreams 1``, torch's
    thread count, the IR's inference precision, dino's extension where the IR holds its op): an independent client
    beside the table's OpenVINO rows. Its median latency, in s."""
    import re

    import torch

    from dino.ops.openvino_build import load_openvino_extension
    from dino.predict.openvino_runtime import inference_precision

    lines = ["| IR | benchmark_app median s | iterations |", "|---|---|---|"]
    for xml in sorted(Path(args.benchmark_app).glob("*.xml")):
        graph, precision = xml.stem.split("_")
        cmd = [str(Path(sys.executable).with_name("benchmark_app")), "-m", str(xml), "-d", "CPU", "-hint", "none",
               "-nstreams", "1", "-nthreads", str(torch.get_num_threads()), "-infer_precision",
               inference_precision(precision), "-niter", str(max(3, args.warmup + args.iters)), "-api", "sync"]
        if graph == "plugin":
            cmd += ["-extensions", str(load_openvino_extension())]
        result = subprocess.run(cmd, capture_output=True, text=True)
        median = re.search(r"Median:\s+([0-9.]+) ms", result.stdout)
        count = re.search(r"Count:\s+([0-9]+)", result.stdout)
        shown = f"{float(median.group(1)) / 1e3:.2f}" if median else f"failed: {(result.stdout + result.stderr)[-200:]!r}"
        lines.append(f"| {xml.stem} | {shown} | {count.group(1) if count else '-'} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def training_rows(args, out_dir: Path) -> tuple[list[dict], str]:
    """Quickstart recipe, ``--train-epochs`` with ``dino train``, kernel on / off alternated; images/s of log.jsonl."""
    runs = []
    for rep in range(args.train_repeats):
        for path in ("kernel", "pytorch"):
            run_dir = out_dir / f"quickstart_{path}_{rep}"
            env = {**os.environ, **({"DINO_DISABLE_KERNEL": "1"} if path == "pytorch" else {})}
            cmd = [sys.executable, "-m", "dino_cli", "train", "recipes/quickstart.py", "--set",
                   f"optim.epochs={args.train_epochs}", f"train.output_dir={run_dir}",
                   "train.eval_every_epochs=0", "optim.lr_drop_epochs=()"]
            start = time.perf_counter()
            result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if result.returncode != 0:
                runs.append({"path": path, "note": f"dino train failed ({result.returncode}): "
                                                   f"{result.stderr.strip().splitlines()[-1][:200]}"})
                continue
            records = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines() if x.strip()]
            ips = [r["images_per_s"] for r in records if "images_per_s" in r]
            runs.append({"path": path, "images_per_s": ips[-1], "wall_s": wall})
            print(f"quickstart training, {path}: {ips[-1]:.1f} images/s ({wall:.0f} s wall)", flush=True)
    lines = ["| quickstart training | images/s per run | median |", "|---|---|---|"]
    medians = {}
    for path in ("kernel", "pytorch"):
        ips = [r["images_per_s"] for r in runs if r["path"] == path and "images_per_s" in r]
        medians[path] = statistics.median(ips) if ips else None
        if ips:
            lines.append(f"| {path} | {', '.join(f'{x:.1f}' for x in ips)} | {medians[path]:.1f} |")
        else:
            lines.append(f"| {path} | - | {next((r['note'] for r in runs if r['path'] == path), '-')} |")
    if medians.get("kernel") and medians.get("pytorch"):
        lines.append(f"\nkernel / PyTorch path: {medians['kernel'] / medians['pytorch']:.2f}x images/s")
    return runs, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--preset", default="dino_r50_4scale")
    parser.add_argument("--image-size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3, help="timed rounds (each row once per round)")
    parser.add_argument("--train-epochs", type=int, default=1, help="quickstart epochs per training run (0: none)")
    parser.add_argument("--train-repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, help="markdown file for the tables (and a .json beside it)")
    parser.add_argument("--train-only", action="store_true", help="only the quickstart training rows")
    parser.add_argument("--benchmark-app", type=Path, metavar="DIR",
                        help="save each OpenVINO row's IR in DIR and time it with OpenVINO's benchmark_app too")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.rows, args)

    import torch  # the parent only reads the environment

    header = (f"{torch.get_num_threads()} threads, torch {torch.__version__}; {args.image_size[0]}x"
              f"{args.image_size[1]}, batch 1; median of {args.iters} alternated calls after {args.warmup} warm-up; "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    def save(rows: list[dict], table: str, train_runs: list[dict] | None = None, train_table: str = "") -> None:
        if args.out is not None:
            args.out.write_text(header + "\n\n" + table + ("\n\n" + train_table if train_table else "") + "\n")
            args.out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows,
                                                                 "training": train_runs or []}, indent=1))

    if args.benchmark_app:
        args.benchmark_app.mkdir(parents=True, exist_ok=True)
    rows, table = inference_rows(args, save) if not args.train_only else ([], "")
    if args.benchmark_app:
        table += "\n\nOpenVINO benchmark_app on the same IRs:\n\n" + benchmark_app_rows(args)
    save(rows, table)
    text = header + "\n\n" + table
    train_runs: list[dict] = []
    if args.train_epochs > 0:
        with tempfile.TemporaryDirectory() as tmp:
            train_runs, train_table = training_rows(args, Path(tmp))
        text += "\n\n" + train_table
        save(rows, table, train_runs, train_table)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
