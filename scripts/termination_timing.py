"""Time from a termination signal to the saved checkpoint and the exit of a one-process ``dino train`` (issue 30).

    python scripts/termination_timing.py quickstart --set train.output_dir=/tmp/term_qs --after-steps 20

Starts the run (``train.log_every_steps=1``), waits until ``steps.jsonl`` holds ``--after-steps`` records (the step
times are when each record appeared), sends the signal, and prints: the median step time, when the checkpoint folder
named in the exit line was last written, and when the process exited, each in seconds after the signal. The signal
lands during the next step, which finishes before the save: the checkpoint time includes the rest of that step.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="FIELD=VALUE")
    parser.add_argument("--after-steps", type=int, default=20)
    parser.add_argument("--signal", default="SIGTERM")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the steps and the exit")
    args = parser.parse_args()
    out = next((Path(o.split("=", 1)[1]) for o in args.overrides if o.startswith("train.output_dir=")), None)
    if out is None or out.exists():
        parser.error("give a new train.output_dir=... in --set (the run must start from nothing)")
    cmd = [sys.executable, "-m", "dino_cli", "train", args.recipe, "--set", *args.overrides, "train.log_every_steps=1"]
    log = out.parent / f"{out.name}.console.log"
    with open(log, "w") as console:
        proc = subprocess.Popen(cmd, stdout=console, stderr=subprocess.STDOUT)
        steps_file, seen, step_times = out / "steps.jsonl", 0, []
        deadline = time.monotonic() + args.timeout
        while seen < args.after_steps:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                print(f"the run ended or timed out before {args.after_steps} steps; see {log}", file=sys.stderr)
                return 1
            lines = steps_file.read_text().count("\n") if steps_file.exists() else 0
            if lines > seen:
                step_times += [time.monotonic()] * (lines - seen)
                seen = lines
            time.sleep(0.02)
        sent = time.monotonic()
        proc.send_signal(getattr(signal, args.signal))
        rc = proc.wait(timeout=args.timeout)
        exited = time.monotonic() - sent
    text = log.read_text()
    match = re.search(r"terminated by \w+ at step (\d+); saved (\S+);", text)
    if match is None:
        print(f"exit {rc} without the termination line; see {log}", file=sys.stderr)
        return 1
    checkpoint = Path(match.group(2))
    newest = max(p.stat().st_mtime for p in [checkpoint, *checkpoint.rglob("*")])
    saved_after = newest - (time.time() - (time.monotonic() - sent))
    step_s = statistics.median(b - a for a, b in zip(step_times[1:], step_times[2:])) if len(step_times) > 2 else None
    step = f"{step_s:.2f} s" if step_s is not None else "? (wait for 3 steps or more)"
    print(f"{args.recipe}: median step {step}; {args.signal} after step {seen}: stopped at step "
          f"{match.group(1)}, checkpoint written by {saved_after:.2f} s, exit {rc} at {exited:.2f} s after the signal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
