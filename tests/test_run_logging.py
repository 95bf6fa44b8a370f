"""What a run shows a person: one short console line per epoch (the figures of its log.jsonl record), steps.jsonl
with each step once across an interruption and its resumption, curves.png after training and pr_curves.png of
`dino eval`."""
import json
import logging
import re
from pathlib import Path

import pytest
from PIL import Image

from dino.engine import checkpointer as checkpointer_module
from dino.engine.epoch_line import epoch_line, format_duration
from dino.engine.evaluate import evaluate_checkpoint
from dino.engine.recipe import load_recipe
from dino.engine.step_log import StepLog
from dino.engine.train import train

TINY = str(Path(__file__).resolve().parent / "engine_tiny_recipe.py")
MAX_LINE = 160


def tiny(data_root, out, *overrides):
    return load_recipe(TINY, [f"data.root={data_root}", f"train.output_dir={out}", *overrides])


def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("run_logging_data") / "shapes")


@pytest.fixture(scope="module")
def evaluated_run(data_root, tmp_path_factory):
    """The tiny recipe, 2 epochs of 2 steps, evaluated after each; (output folder, INFO lines of dino.engine)."""
    out = tmp_path_factory.mktemp("evaluated") / "run"
    handler = _Lines()
    logger = logging.getLogger("dino.engine")
    logger.addHandler(handler)
    # setLevel, not `logger.level =`: only setLevel clears the cache of isEnabledFor answers, and an earlier test in
    # this process may have asked this logger about INFO while it was at WARNING (no lines here, in a 2-worker run).
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        train(tiny(data_root, out, "train.eval_every_epochs=1"))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    return out, handler.lines


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _figure(line, label, pattern=r"([^\s)]+)"):
    match = re.search(rf"(?:^| |\(){re.escape(label)} {pattern}", line)
    assert match, f"{label!r} not in {line!r}"
    return match.group(1)


def test_each_epoch_is_one_short_line_with_the_figures_of_its_log_record(evaluated_run):
    out, lines = evaluated_run
    records = _records(out / "log.jsonl")
    shown = [line for line in lines if line.startswith("epoch ") and "img/s" in line]
    assert len(records) == 2, records
    assert len(shown) == 2, lines
    for line, record in zip(shown, records):
        assert len(line) <= MAX_LINE and "\n" not in line, line
        assert line.startswith(f"epoch {record['epoch']}/2 ")
        for label, key in (("loss", "loss"), ("cls", "loss_ce"), ("L1", "loss_bbox"), ("GIoU", "loss_giou")):
            assert float(_figure(line, label)) == pytest.approx(record["train"][key], rel=5e-4)
        assert float(_figure(line, "lr")) == pytest.approx(record["lr"], rel=0.05)
        assert float(re.search(r" (\S+) img/s", line).group(1)) == pytest.approx(record["images_per_s"], abs=0.05)
        assert f" {format_duration(record['epoch_time_s'])} ETA " in line
        assert _figure(line, "ETA") == format_duration(record["eta_s"])
        assert float(_figure(line, "AP")) == pytest.approx(record["eval"]["AP"], abs=5e-4)
        assert float(_figure(line, "AP50")) == pytest.approx(record["eval"]["AP50"], abs=5e-4)
        assert line == epoch_line(record, 2)
    assert records[-1]["eta_s"] == 0.0 and records[0]["eta_s"] > 0
    # The whole record is no longer on the console.
    assert not [line for line in lines if "loss_ce_dn" in line]


def test_epoch_line_of_a_long_run_at_its_widest_stays_short():
    record = {"epoch": 118, "lr": 1.234e-5, "images_per_s": 12345.6, "epoch_time_s": 123456.0, "eta_s": 9876543.0,
              "train": {"loss": 123.456789, "loss_ce": 12.3456, "loss_bbox": 12.3456, "loss_giou": 12.3456},
              "eval": {"AP": 0.5123, "AP50": 0.7012}, "eval_ema": {"AP": 0.5234}, "skipped_steps": 1234,
              "skipped_images": 567}
    line = epoch_line(record, 120)
    assert line == ("epoch 118/120 loss 123.5 (cls 12.35 L1 12.35 GIoU 12.35) lr 1.2e-05 12346 img/s 34h17m "
                    "ETA 114d07h AP 0.512 (EMA 0.523) AP50 0.701 skipped 1234 steps 567 images")
    assert len(line) <= MAX_LINE
    assert epoch_line({**record, "train": {}, "eta_s": None, "eval": None, "skipped_steps": 0}, 120) == (
        "epoch 118/120 loss - (cls - L1 - GIoU -) lr 1.2e-05 12346 img/s 34h17m ETA ? skipped 567 images")
    assert [format_duration(s) for s in (0.4, 59.6, 61, 3599, 3600, 47 * 3600 + 59 * 60, 49 * 3600)] == [
        "0s", "1m00s", "1m01s", "59m59s", "1h00m", "47h59m", "2d01h"]


def test_curves_are_drawn_after_training(evaluated_run):
    out, _ = evaluated_run
    with Image.open(out / "curves.png") as image:
        image.load()
        assert image.size == (1500, 800)
    steps = _records(out / "steps.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["epoch"] for r in steps] == [1, 1, 2, 2]


def test_dino_eval_draws_pr_curves_beside_results(evaluated_run, data_root, tmp_path, capsys):
    out, _ = evaluated_run
    stats = evaluate_checkpoint(tiny(data_root, out), out / "model.safetensors", tmp_path / "eval")
    assert f"precision-recall curves (all categories and the 3 largest): {tmp_path / 'eval' / 'pr_curves.png'}" \
        in capsys.readouterr().out
    with Image.open(tmp_path / "eval" / "pr_curves.png") as image:
        image.load()
        assert image.size == (1200, 500)
    assert sum(stats["pr_curves"]["all"][0]) / 101 == pytest.approx(stats["AP50"], abs=1e-12)
    assert "pr_curves" not in json.loads((tmp_path / "eval" / "results.json").read_text())  # drawn, not written


def test_an_interrupted_and_resumed_run_logs_each_step_once(data_root, tmp_path, monkeypatch):
    # Killed after step 4 was logged, before its epoch-end checkpoint: the run resumes from step 3's checkpoint
    # (train.checkpoint_every_steps=1) and trains step 4 again.
    out = tmp_path / "run"
    save = checkpointer_module.Checkpointer.save

    def killed_at_step_4(self, progress, epoch_end):
        if progress.global_step == 4:
            raise KeyboardInterrupt
        return save(self, progress, epoch_end)

    monkeypatch.setattr(checkpointer_module.Checkpointer, "save", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(data_root, out))
    assert [r["step"] for r in _records(out / "steps.jsonl")] == [1, 2, 3, 4]
    monkeypatch.setattr(checkpointer_module.Checkpointer, "save", save)
    (out / "steps.jsonl").write_text((out / "steps.jsonl").read_text() + '{"step": 5, "epo')  # a cut-off append
    assert train(tiny(data_root, out))["global_step"] == 4
    steps = _records(out / "steps.jsonl")
    assert [(r["step"], r["epoch"]) for r in steps] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert all(r["loss"] > 0 and r["lr"] == pytest.approx(1e-3) for r in steps)
    assert set(steps[0]) == {"step", "epoch", "loss", "loss_ce", "loss_bbox", "loss_giou", "lr"}


def test_step_log_cuts_back_to_the_resumed_step_and_appends(tmp_path):
    path = tmp_path / "steps.jsonl"
    path.write_text("".join(json.dumps({"step": s, "epoch": 1, "loss": 1.0, "lr": 0.1}) + "\n" for s in range(1, 7)))
    log = StepLog(tmp_path, resumed_step=4)
    assert [r["step"] for r in _records(path)] == [1, 2, 3, 4]
    log.append(5, 2, 0.01, {"loss": 3.0, "loss_ce": 1.0, "loss_bbox": 0.5, "loss_giou": 1.5, "loss_ce_0": 9.0})
    assert _records(path)[-1] == {"step": 5, "epoch": 2, "loss": 3.0, "loss_ce": 1.0, "loss_bbox": 0.5,
                                  "loss_giou": 1.5, "lr": 0.01}
    StepLog(tmp_path, resumed_step=0)  # a run started over in the same folder
    assert path.read_text() == ""
    StepLog(tmp_path, resumed_step=3, enabled=False).append(1, 1, 0.1, {"loss": 1.0})  # not the main process
    assert path.read_text() == ""
