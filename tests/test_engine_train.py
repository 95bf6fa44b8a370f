"""Engine behaviour in one process: exact resume, checkpoint retention, overfitting, weights files, dino eval."""
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dino.engine.checkpoint import checkpoint_dirs, latest_checkpoint, read_progress
from dino.engine.recipe import load_recipe
from dino.engine.train import train
from dino.errors import UserError
from dino.model_loading import load_weights, read_state_dict
from dino.weights import save_weights

TINY = str(Path(__file__).resolve().parent / "engine_tiny_recipe.py")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("engine_data") / "shapes")


def tiny(data_root, out, *overrides):
    return load_recipe(TINY, [f"data.root={data_root}", f"train.output_dir={out}", *overrides])


EMA = ("train.ema=true", "train.ema_decay=0.5")


def test_stopped_and_resumed_run_equals_uninterrupted_run(data_root, tmp_path, caplog):
    # 8 images, 2 per device, total batch 4: 2 accumulation steps, 2 optimizer steps per epoch, 4 in 2 epochs.
    full = train(tiny(data_root, tmp_path / "full", *EMA, "train.keep_checkpoints=4"))
    assert full["global_step"] == 4

    stopped = train(tiny(data_root, tmp_path / "split", *EMA, "train.max_steps=3"))
    assert stopped["global_step"] == 3
    progress = read_progress(latest_checkpoint(tmp_path / "split"))
    assert (progress["epoch"], progress["batches_in_epoch"], progress["global_step"]) == (1, 2, 3)  # mid-epoch 2
    assert progress["recipe"]["optim.lr"] == 1e-3 and progress["recipe"]["train.ema_decay"] == 0.5
    shutil.copytree(tmp_path / "split", tmp_path / "changed")

    resumed = train(tiny(data_root, tmp_path / "split", *EMA))  # auto-resume from the output folder
    assert resumed["global_step"] == 4
    for name in ("model.safetensors", "model_ema.safetensors"):
        a = load_file(str(tmp_path / "full" / name))
        b = load_file(str(tmp_path / "split" / name))
        assert a.keys() == b.keys()
        differing = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differing, f"{name}: {len(differing)} tensors differ after resume, e.g. {differing[:3]}"
    # The epoch means of log.jsonl cover the whole resumed epoch (its sums before the stop came with progress.json):
    # the same floats, summed in the same order, as the uninterrupted run's.
    def epoch_means(run):
        return {r["epoch"]: r["train"] for r in map(json.loads, (tmp_path / run / "log.jsonl").read_text().splitlines())}
    assert epoch_means("split") == epoch_means("full")
    assert progress["losses_counted"] == 2 and set(progress["loss_sums"]) >= {"loss", "loss_ce"}

    # Every checkpoint is complete (no temp folders left); EMA follows ema = d * ema + (1 - d) * w step by step.
    ckpts = checkpoint_dirs(tmp_path / "full")
    assert [p.name for p in ckpts] == ["step_00000001", "step_00000002_end", "step_00000003", "step_00000004_end"]
    assert not [p for p in (tmp_path / "full" / "checkpoints").iterdir() if p.name.startswith(".")]
    ema = None
    for ckpt in ckpts:
        w = load_file(str(ckpt / "model.safetensors"))
        got = load_file(str(ckpt / "model_ema.safetensors"))
        expected = w if ema is None else {k: 0.5 * ema[k] + 0.5 * w[k] for k in w}
        for k in w:
            if w[k].is_floating_point():
                torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6, msg=f"{ckpt.name} {k}")
        ema = got
    assert not torch.equal(ema["class_embed.weight"], w["class_embed.weight"])

    # The weights say which categories and which recipe they were trained with.
    with safe_open(str(tmp_path / "full" / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["categories"]) == [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"},
                                                  {"id": 3, "name": "triangle"}]
    assert json.loads(metadata["recipe"])["optim.total_batch_size"] == 4
    log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(r["train"]["loss"] > 0 for r in log)
    assert [r["lr"] for r in log] == pytest.approx([1e-3, 1e-4])

    # Resuming with another learning rate is refused, naming the field; --resume-anyway applies it (the schedule too).
    with pytest.raises(UserError, match=r"different recipe \(optim.lr: 0.001 -> 0.002\); pass --resume-anyway"):
        train(tiny(data_root, tmp_path / "changed", *EMA, "optim.lr=2e-3"))
    with caplog.at_level(logging.WARNING, logger="dino.engine"):
        train(tiny(data_root, tmp_path / "changed", *EMA, "optim.lr=2e-3"), resume_anyway=True)
    assert "with a changed recipe (--resume-anyway), new values apply: optim.lr: 0.001 -> 0.002" in caplog.text
    log = [json.loads(line) for line in (tmp_path / "changed" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["epoch"] == 2 and log[-1]["lr"] == pytest.approx(2e-4)  # the new base lr after the epoch-2 drop


def test_explicit_resume_of_missing_checkpoint_is_an_error(data_root, tmp_path):
    with pytest.raises(UserError, match="no checkpoint found"):
        train(tiny(data_root, tmp_path / "out"), resume=str(tmp_path / "nothing"))


def test_overfitting_two_images_halves_the_loss(tmp_path):
    # 60 steps on the same 2 images (crop = whole image, flips kept): measured ~25 -> ~9.5, asserted 2x.
    cfg = tiny(str(tmp_path / "two"), tmp_path / "out", "data.shapes_train_images=2", "optim.total_batch_size=2",
               "optim.epochs=60", "optim.lr_drop_epochs=60", "train.checkpoint_every_steps=0", "train.keep_checkpoints=1",
               "data.crop_size=64,64")
    train(cfg)
    losses = [json.loads(line)["train"]["loss"] for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 60
    first, last = losses[0], sum(losses[-5:]) / 5
    assert last < first / 2, f"loss went from {first:.2f} to {last:.2f} (mean of the last 5 steps), expected a 2x drop"


def test_weights_roundtrip_with_shared_heads_and_ignore_keys(tmp_path):
    from dino import build_model

    cfg = tiny(str(tmp_path / "d"), tmp_path / "o")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    path = tmp_path / "model.safetensors"
    save_weights(model.state_dict(), path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp file renamed away

    same = build_model(cfg.model)
    load_weights(same, path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, same.state_dict()[k]), k

    # Fine-tuning on 5 classes: the class heads and label embedding have other shapes.
    cfg.model.num_classes = 5
    cfg.model.denoising.labelbook_size = 5
    other = build_model(cfg.model)
    with pytest.raises(ValueError, match=r"5 of another shape \(class_embed\.bias \(4,\) vs \(5,\), class_embed\.weight \(4, 64\) vs \(5, 64\)"):
        load_weights(other, path)
    missing, _ = load_weights(other, path, ignore_keys=["label_enc.weight", "class_embed"])
    assert missing == []
    kept = [k for k in other.state_dict() if "class_embed" not in k and "label_enc" not in k]
    assert all(torch.equal(other.state_dict()[k], model.state_dict()[k]) for k in kept)


def test_official_pth_is_detected_and_converted(tmp_path, monkeypatch):
    import dino.convert

    seen = {}

    def fake_convert(state_dict, model_cfg):
        seen["keys"], seen["num_classes"] = sorted(state_dict), model_cfg.num_classes
        return {"converted": torch.ones(1)}

    monkeypatch.setattr(dino.convert, "convert_official_state_dict", fake_convert)
    from dino.config import ModelConfig

    official = {"backbone.0.body.conv1.weight": torch.zeros(1), "class_embed.0.weight": torch.zeros(7, 4)}
    torch.save({"model": official, "epoch": 11}, tmp_path / "checkpoint0011_4scale.pth")
    out = read_state_dict(tmp_path / "checkpoint0011_4scale.pth", ModelConfig())
    assert out.keys() == {"converted"}
    assert seen == {"keys": sorted(official), "num_classes": 7}  # head size taken from the checkpoint
    torch.save({"model": {"x": 1}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        read_state_dict(tmp_path / "bad.pth")


def test_dino_eval_prints_the_ap_table(data_root, tmp_path, capsys):
    from dino import build_model
    from dino_cli import main

    cfg = tiny(data_root, tmp_path / "o")
    # A checkpoint folder stands for its model.safetensors.
    save_weights(build_model(cfg.model).state_dict(), tmp_path / "step_00000004_end" / "model.safetensors")
    rc = main(["eval", "--recipe", TINY, "--checkpoint", str(tmp_path / "step_00000004_end"),
               "--set", f"data.root={data_root}", "--output-dir", str(tmp_path / "eval")])
    assert rc == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith(" Average")]
    assert len(table) == 12
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["num_images"] == 5 and set(results) >= {"AP", "AP50", "AR100"}
    predictions = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert {p["image_id"] for p in predictions} <= set(range(1, 100)) and len(predictions) > 0


def test_bf16_step_matches_fp32_on_the_same_batch(data_root, tmp_path):
    # One batch through the same weights in fp32 and under bf16 autocast (as the engine runs it: Accelerate's
    # autocast, outputs back to fp32 for the criterion). Measured on CPU (this tiny model at random init): loss
    # relative difference 1.2e-3; gradient relative L2 difference 0.28, cosine 0.96 -- at random init bf16 rounding
    # flips near-tied discrete choices (the two-stage top-k proposals, the Hungarian matching), so the gradient
    # bound is loose; the loss bound is ~4x the measurement.
    import copy

    from dino import build_model
    from dino.criterion import build_criterion
    from dino.engine.one_epoch import weighted_losses
    from dino.engine.setup import build_accelerator
    from dino.engine.train import build_train_loader
    from dino.engine.batching import plan_batches
    from dino.data import build_dataset

    cfg = tiny(data_root, tmp_path / "o")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    batch = next(iter(build_train_loader(build_dataset(cfg.data, "train"), plan_batches(2, 1, 2), cfg)))
    results = {}
    for precision in ("no", "bf16"):
        cfg.train.mixed_precision = precision
        accelerator = build_accelerator(cfg)
        prepared = accelerator.prepare(copy.deepcopy(model))
        torch.manual_seed(1)  # the same denoising noise in both runs
        _, weighted, bad = weighted_losses(accelerator, prepared, build_criterion(cfg.model), *batch)
        assert not bad
        weighted["loss"].backward()
        grads = torch.cat([p.grad.flatten() for p in prepared.parameters() if p.grad is not None])
        results[precision] = (weighted["loss"].item(), grads)
    (loss32, g32), (loss16, g16) = results["no"], results["bf16"]
    assert abs(loss16 - loss32) / loss32 < 5e-3, (loss16, loss32)
    assert ((g16 - g32).norm() / g32.norm()).item() < 0.5
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0).item() > 0.9
    assert not torch.equal(g16, g32)  # bf16 really ran


def test_unknown_mixed_precision_is_rejected(data_root, tmp_path):
    with pytest.raises(UserError, match="train.mixed_precision must be one of"):
        train(tiny(data_root, tmp_path / "x", "train.mixed_precision=fp8"))
    with pytest.raises(UserError, match="train.keep_checkpoints must be an integer >= 1"):
        train(tiny(data_root, tmp_path / "x", "train.keep_checkpoints=0"))


@pytest.mark.filterwarnings("ignore:.*per-layer copies of the shared heads differ")  # synthetic weights, not real ones
def test_dino_eval_converts_an_official_pth_in_memory(tmp_path, capsys, official_r50_4scale_pth):
    from dino_cli import main

    path = official_r50_4scale_pth
    # The official R50 recipe on 2 shapes images at 256 px (enough encoder tokens for 900 queries).
    rc = main(["eval", "--recipe", "dino_r50_4scale_12ep", "--checkpoint", str(path), "--output-dir", str(tmp_path / "e"),
               "--set", "data.dataset=shapes", f"data.root={tmp_path / 'shapes'}", "data.train_images=train",
               "data.train_annotations=annotations/train.json", "data.val_images=val",
               "data.val_annotations=annotations/val.json", "data.shapes_train_images=1", "data.shapes_val_images=2",
               "data.val_scale=256", "data.val_max_size=256", "data.num_workers=0", "model.backbone.pretrained=none"])
    assert rc == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.startswith(" Average")]) == 12
    assert json.loads((tmp_path / "e" / "results.json").read_text())["num_images"] == 2
