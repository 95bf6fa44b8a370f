"""Evaluation as the official code runs it: each image alone (train.eval_batch_size=1, no padding to a neighbour's
size), and the same predictions and AP on 1 or 2 processes."""
import json
import subprocess

import pytest
import torch

from dino.data import generate_shapes_dataset
from dino.engine.evaluate import build_val_loader, evaluate_checkpoint, predict
from dino.engine.recipe import load_recipe
from dino.engine.setup import build_accelerator
from dino.errors import UserError
from dino.models.dino import build_model
from dino.postprocess import PostProcess
from dino.weights import save_weights

from tests.launching import ACCELERATE_LAUNCH, REPO, TINY, free_port, launch_env, two_processes


def test_evaluation_runs_each_image_alone_by_default():
    assert load_recipe(TINY).train.eval_batch_size == 1
    assert load_recipe("dino_r50_4scale_12ep").train.eval_batch_size == 1  # its training batch is 2 per device
    with pytest.raises(UserError, match=r"^train.eval_batch_size must be >= 1, got 0 \(1 evaluates each image alone, "
                                        r"as the official code\)$"):
        build_val_loader([], load_recipe(TINY, ["train.eval_batch_size=0"]))


def _mixed_size_images() -> list:
    g = torch.Generator().manual_seed(0)
    sizes = [(64, 64), (48, 64), (64, 40)]
    return [(torch.rand(3, h, w, generator=g), {"image_id": torch.tensor(i), "orig_size": torch.tensor([h, w])})
            for i, (h, w) in enumerate(sizes)]


def test_each_image_gets_the_outputs_it_has_alone():
    cfg = load_recipe(TINY, ["model.backbone.pretrained=None"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    postprocess = PostProcess(cfg.model.num_select)
    samples = _mixed_size_images()
    with torch.no_grad():
        alone = [postprocess(model(image[None], torch.zeros(1, *image.shape[1:], dtype=torch.bool)),
                             target["orig_size"][None])[0] for image, target in samples]
    accelerator = build_accelerator(cfg)
    for batch_size, expect_equal in [(1, True), (3, False)]:
        loader = build_val_loader(samples, load_recipe(TINY, [f"train.eval_batch_size={batch_size}"]))
        records = predict(accelerator, model, postprocess, loader)
        assert [r["image_id"] for r in records] == [0, 1, 2]
        box_error = max((r["boxes"] - a["boxes"]).abs().max().item() for r, a in zip(records, alone))
        score_error = max((r["scores"] - a["scores"]).abs().max().item() for r, a in zip(records, alone))
        if expect_equal:
            assert box_error == score_error == 0, (box_error, score_error)
        else:
            # Padded to the largest image, the smaller ones get other outputs: what the default avoids.
            assert box_error > 1e-3, box_error


@pytest.mark.slow
def test_two_processes_give_the_predictions_and_ap_of_one(tmp_path):
    root = tmp_path / "shapes"
    cfg = load_recipe(TINY, [f"data.root={root}", "model.backbone.pretrained=None"])
    d = cfg.data
    generate_shapes_dataset(root, d.shapes_train_images, d.shapes_val_images, d.shapes_image_size, seed=d.shapes_seed)
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.safetensors"
    save_weights(build_model(cfg.model).state_dict(), checkpoint)
    # One thread, as each launched process has (launch_env): the predictions are compared exactly, and MKL's float32
    # GEMM on an Intel CPU sums in another order at 2 threads (measured 7e-9 apart on a 2-core Xeon).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = evaluate_checkpoint(cfg, checkpoint, tmp_path / "one")
    finally:
        torch.set_num_threads(threads)

    cmd = [*ACCELERATE_LAUNCH, *two_processes(free_port()), "-m", "dino_cli", "eval", "--recipe", TINY,
           "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "two"), "--set", f"data.root={root}"]
    run = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    # 5 images over 2 processes: Accelerate repeats one image to even the shards; the repeat is dropped.
    assert one["num_images"] == two["num_images"] == 5
    predictions = [json.loads((tmp_path / name / "predictions.json").read_text()) for name in ("one", "two")]
    assert len({p["image_id"] for p in predictions[0]}) == 5
    assert predictions[0] == predictions[1]
    assert {k: one[k] for k in ("AP", "AP50", "AP75")} == {k: two[k] for k in ("AP", "AP50", "AP75")}
