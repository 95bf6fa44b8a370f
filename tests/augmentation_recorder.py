"""Runs ``dino.engine.train.train`` on the tiny engine recipe with the step loop replaced by a recorder of the samples.

``python tests/augmentation_recorder.py FIELD=VALUE ...`` (recipe overrides; alone or under ``accelerate launch``).
Each process appends one json line per training sample it receives to ``<train.output_dir>/augmented_<rank>.jsonl``:
``{"epoch", "image_id", "digest"}``, where ``digest`` is a sha1 of the augmented image (its unpadded ``(3, h, w)``
float32 pixels) and of its normalised boxes and labels. Everything of ``train`` but the model steps and the
checkpoint files runs as in a real run: the datasets, the loader, ``accelerator.prepare`` and the epoch loop.
Used by tests/test_augmentation_seeding.py.
"""
import hashlib
import json
import sys
from pathlib import Path

import dino.engine.train as engine
from dino.engine.checkpointer import Checkpointer
from dino.engine.one_epoch import EpochResult
from dino.engine.recipe import load_recipe

TINY = str(Path(__file__).resolve().parent / "engine_tiny_recipe.py")


def digest(image, target) -> str:
    h, w = (int(v) for v in target["size"])
    sha = hashlib.sha1(image[:, :h, :w].contiguous().numpy().tobytes())
    sha.update(target["boxes"].numpy().tobytes())
    sha.update(target["labels"].numpy().tobytes())
    return sha.hexdigest()


def record_epoch(accelerator, model, criterion, loader, optimizer, progress, cfg, per_epoch, accumulation, ema=None,
                 checkpointer=None, step_log=None, termination=None) -> EpochResult:
    """Stands in for ``train_one_epoch``: iterates the epoch's batches and records every sample, no model step."""
    rows = []
    for images, _, targets in loader:
        rows += [{"epoch": progress.epoch, "image_id": int(t["image_id"]), "digest": digest(image, t)}
                 for image, t in zip(images, targets)]
        progress.batches_in_epoch += 1
    progress.global_step += progress.batches_in_epoch // accumulation
    with open(Path(cfg.train.output_dir) / f"augmented_{accelerator.process_index}.jsonl", "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return EpochResult({}, progress.batches_in_epoch, 0.0, False)


if __name__ == "__main__":
    engine.train_one_epoch = record_epoch
    Checkpointer.save = Checkpointer.save_final = lambda *args, **kwargs: None  # no weights to keep
    engine.train(load_recipe(TINY, sys.argv[1:]))
