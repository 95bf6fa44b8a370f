"""A training sample's augmentation is a function of (seed, epoch, index) only: fresh every epoch, on any process count.

``tests/augmentation_recorder.py`` runs the real training loop (``dino.engine.train.train``) with the model steps
replaced by a recorder of each sample's augmented image and boxes; here once alone and once under
``accelerate launch`` with 2 gloo CPU processes (and a DataLoader worker each, so the epoch must reach the worker).
"""
import collections
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launching import REPO, free_port, launch_env
RECORDER = str(REPO / "tests" / "augmentation_recorder.py")
IMAGES, EPOCHS = 16, 4
# Five shorter sides, three crop scales and a 40..64 px crop: two draws of one image coincide by chance only when both
# skip the crop with the same flip and scale (1/4 * 1/2 * 1/5 = 1/40, ~2.4 of the 96 (image, epoch pair) combos;
# the recorded seed gives 4 of 96).
OVERRIDES = [f"data.shapes_train_images={IMAGES}", "data.shapes_val_images=5", "data.train_scales=48,56,64,72,80",
             "data.train_max_size=100", "data.crop_resize_scales=56,64,72", "data.crop_size=40,64",
             f"optim.epochs={EPOCHS}", f"optim.lr_drop_epochs={EPOCHS}", "train.checkpoint_every_steps=0"]
pytestmark = pytest.mark.slow


def _records(out: Path) -> dict[tuple[int, int], str]:
    """``{(epoch, image_id): digest}`` over all processes; each image exactly once per epoch."""
    rows = [json.loads(line) for f in sorted(out.glob("augmented_*.jsonl")) for line in f.read_text().splitlines()]
    records = {(r["epoch"], r["image_id"]): r["digest"] for r in rows}
    assert len(records) == len(rows) == IMAGES * EPOCHS, f"{len(rows)} samples, {len(records)} distinct"
    return records


def _repeats(records: dict[tuple[int, int], str]) -> int:
    """(image, pair of epochs) combos where the image got the same augmentation in both epochs."""
    by_image = collections.defaultdict(list)
    for (_, image_id), digest in sorted(records.items()):
        by_image[image_id].append(digest)
    return sum(a == b for digests in by_image.values() for a, b in itertools.combinations(digests, 2))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from dino.data import generate_shapes_dataset

    root = tmp_path_factory.mktemp("aug_data") / "shapes"
    generate_shapes_dataset(root, IMAGES, 5, 64, seed=0)  # the tiny recipe's image size and seed
    return root


def test_each_epoch_draws_fresh_augmentations_identical_on_1_and_2_processes(data_root, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = [f"data.root={data_root}", *OVERRIDES]
    alone = [sys.executable, RECORDER, *common, "data.num_workers=0", f"train.output_dir={one}"]
    launched = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--num_processes", "2", "--num_machines", "1", "--main_process_port",
                str(free_port()), RECORDER, *common, "data.num_workers=1", f"train.output_dir={two}"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in (alone, launched)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    assert sorted(f.name for f in two.glob("augmented_*.jsonl")) == ["augmented_0.jsonl", "augmented_1.jsonl"]
    single, double = _records(one), _records(two)
    # With the epoch lost on 2 processes every image repeated its epoch-0 augmentation: 96 of 96 combos.
    assert _repeats(double) == _repeats(single) <= 8
    for epoch in range(EPOCHS):
        assert {k: v for k, v in double.items() if k[0] == epoch} == {k: v for k, v in single.items() if k[0] == epoch}
