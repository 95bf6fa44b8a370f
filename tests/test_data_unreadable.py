"""An image that cannot be read: one line naming it (also from a DataLoader worker), where the run can resume from,
and `data.skip_unreadable` training on with the skips counted in log.jsonl."""
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from torch._utils import ExceptionWrapper

import dino_cli
from dino.data import CocoDetection, UnreadableImageError, collate_fn, prepare_dataset
from dino.engine.recipe import load_recipe
from dino.engine.seeding import EpochSeededDataset
from dino.engine.train import train
from dino.errors import UserError
from dino.models.dino import build_model
from dino.weights import save_weights
from tests.test_data_coco import make_dataset
from tests.launching import ACCELERATE_LAUNCH, REPO, free_port, launch_command, launch_env, two_processes

TINY = str(Path(__file__).resolve().parent / "engine_tiny_recipe.py")


def truncate(path):
    """Keeps the first half of an image file: it still opens (the header is intact) but does not decode."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def _three_images(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 48} for i in (1, 2, 3)]
    images_dir, path = make_dataset(tmp_path, images=images)
    truncate(images_dir / "2.png")
    return images_dir, path


def test_worker_exception_keeps_its_one_line_message():
    """torch re-raises a worker's exception as type(err)(<traceback text>); the message survives as one line."""
    try:
        raise UnreadableImageError("cannot read image a.png (image id 1): image file is truncated")
    except UnreadableImageError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(UnreadableImageError) as info:
        wrapper.reraise()
    assert str(info.value) == "cannot read image a.png (image id 1): image file is truncated"
    assert isinstance(info.value, UserError)


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_raises_one_line_through_the_loader(tmp_path, workers):
    images_dir, path = _three_images(tmp_path)
    loader = torch.utils.data.DataLoader(CocoDetection(images_dir, path), batch_size=3, num_workers=workers,
                                         collate_fn=collate_fn)
    with pytest.raises(UnreadableImageError) as info:
        next(iter(loader))
    assert str(info.value) == f"cannot read image {images_dir / '2.png'} (image id 2): image file is truncated"


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_unreadable_gives_the_next_image_and_counts_it(tmp_path, workers):
    images_dir, path = _three_images(tmp_path)
    ds = CocoDetection(images_dir, path, skip_unreadable=True)
    loader = torch.utils.data.DataLoader(EpochSeededDataset(ds, seed=0), batch_size=3, num_workers=workers,
                                         collate_fn=collate_fn)
    batch = next(iter(loader))
    assert batch.images.shape == (3, 3, 48, 64)  # a full batch: image 3 stands in for image 2
    assert [t["image_id"] for t in batch.targets] == [1, 3, 3]
    assert ds.skipped_unreadable == 1  # counted in the worker, seen by the main process
    # the stand-in's augmentation randomness is that of index 1, whatever the worker count
    again = EpochSeededDataset(ds, seed=0)[1]
    assert torch.equal(again[0], batch.images[1])
    assert ds.skipped_unreadable == 2


def _tiny(root, out, *overrides):
    return load_recipe(TINY, [f"data.root={root}", f"train.output_dir={out}", *overrides])


def test_training_stops_with_one_line_then_resumes_skipping(tmp_path, capsys):
    root, out = tmp_path / "shapes", tmp_path / "out"
    train(_tiny(root, out, "train.max_steps=1"))  # a checkpoint at step 1, then an image goes bad
    truncate(root / "train" / "000003.png")
    rc = dino_cli.main(["train", TINY, "--set", f"data.root={root}", f"train.output_dir={out}",
                        "data.num_workers=2"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"dino train: error: cannot read image {re.escape(str(root / 'train' / '000003.png'))} \(image id 4\): "
        rf"image file is truncated; training stopped at step \d; last checkpoint: {re.escape(str(out))}/checkpoints/"
        r"step_\d+(_end)? \(rerunning resumes from it\); run `dino data check --recipe RECIPE` \(same --set\) to "
        r"list every such image, or --set data.skip_unreadable=true to skip them", line), line
    # the same run, skipping: it resumes (skip_unreadable is not a recipe change) and counts the skips per epoch
    result = train(_tiny(root, out, "data.skip_unreadable=true"))
    assert result["global_step"] == 4
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log][-1] == 2 and log[-1]["skipped_images"] == 1  # each image is drawn once an epoch


def test_stop_without_a_checkpoint_says_so(tmp_path):
    root, out = tmp_path / "shapes", tmp_path / "out"
    cfg = _tiny(root, out)
    prepare_dataset(cfg.data)
    for i in range(8):
        truncate(root / "train" / f"{i:06d}.png")
    with pytest.raises(UserError, match=rf"; training stopped at step 0; no checkpoint in {re.escape(str(out))} yet;"):
        train(cfg)


@pytest.mark.slow
def test_two_processes_count_the_skips_of_both(tmp_path):
    """Each process skips the bad image when its shard draws it; the epoch record sums both processes' counts."""
    root, out = tmp_path / "shapes", tmp_path / "out"
    prepare_dataset(_tiny(root, out).data)
    truncate(root / "train" / "000003.png")
    cmd = launch_command("--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
                         overrides=[f"data.root={root}", f"train.output_dir={out}", "data.skip_unreadable=true",
                                    "data.num_workers=1"])
    run = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["skipped_images"] for r in log] == [1, 1]  # 8 images, 2 x 2 per batch, drop_last: all drawn each epoch


def test_image_deleted_after_the_dataset_was_built_names_the_file(tmp_path):
    images_dir, path = make_dataset(tmp_path)
    ds = CocoDetection(images_dir, path)
    (images_dir / "a.png").unlink()
    with pytest.raises(UnreadableImageError) as info:
        ds[0]
    assert str(info.value) == (f"cannot read image {images_dir / 'a.png'} (image id 1): [Errno 2] No such file or "
                               f"directory: '{images_dir / 'a.png'}'")


@pytest.mark.slow
def test_two_processes_stop_together_with_the_same_line(tmp_path):
    """The process whose shard draws the bad image and the other one stop at the same micro-batch, each with the one
    line naming the image; neither dies in a collective ("Connection closed by peer")."""
    root, out = tmp_path / "shapes", tmp_path / "out"
    prepare_dataset(_tiny(root, out).data)
    truncate(root / "train" / "000003.png")
    cmd = launch_command("--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
                         overrides=[f"data.root={root}", f"train.output_dir={out}", "data.num_workers=1"])
    run = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    marker = "launch.py: error: "
    errors = [line[line.index(marker):] for line in run.stderr.splitlines() if marker in line]  # after a bar's \r
    assert len(errors) == 2 and len(set(errors)) == 1, run.stderr[-3000:]
    assert errors[0].startswith(f"{marker}cannot read image {root / 'train' / '000003.png'} (image id 4): "), errors[0]
    assert "data.skip_unreadable=true" in errors[0]
    assert "Connection closed by peer" not in run.stderr, run.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_evaluating_stop_together_with_the_same_line(tmp_path):
    root = tmp_path / "shapes"
    cfg = _tiny(root, tmp_path / "out", "model.backbone.pretrained=None")
    prepare_dataset(cfg.data)
    truncate(root / "val" / "000002.png")
    checkpoint = tmp_path / "model.safetensors"
    save_weights(build_model(cfg.model).state_dict(), checkpoint)
    cmd = [*ACCELERATE_LAUNCH, *two_processes(free_port()), "-m", "dino_cli", "eval", "--recipe", TINY,
           "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "eval"), "--set", f"data.root={root}"]
    run = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    marker = "dino eval: error: "
    errors = [line[line.index(marker):] for line in run.stderr.splitlines() if marker in line]
    assert errors == [f"{marker}cannot read image {root / 'val' / '000002.png'} (image id 3): image file is "
                      "truncated"] * 2, run.stderr[-3000:]
    assert "Connection closed by peer" not in run.stderr, run.stderr[-3000:]
