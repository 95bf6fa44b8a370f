"""``dino.evaluate``: ``dino eval`` from Python, returning the COCO metrics instead of printing them only."""
from __future__ import annotations

import os
from collections.abc import Sequence

from dino.api_arguments import check_evaluate_arguments
from dino.config import Recipe
from dino.durable import make_output_dir
from dino.engine.evaluate import evaluate_checkpoint
from dino.model_loading import checkpoint_file
from dino.predict.recipe import detector_recipe


def evaluate(checkpoint: str | os.PathLike, recipe: Recipe | str | None = None, *, overrides: Sequence[str] = (),
             output_dir: str | os.PathLike | None = None) -> dict | None:
    """COCO AP of ``checkpoint`` on its recipe's validation set, as ``dino eval`` computes it (same code).

    ``checkpoint``: ``model.safetensors``, an official ``.pth``, or a training run's or checkpoint's folder.
    ``recipe``: a :class:`dino.config.Recipe`, a recipe name or file; None: the one the checkpoint records.
    ``overrides``: ``section.field=value`` (``--set``), e.g. ``["data.root=/data/coco"]``.
    ``output_dir``: where ``results.json`` and ``predictions.json`` go (None: nothing written).
    Returns the metrics: ``"AP"``, ``"AP50"``, ``"AP75"``, ``"APs"``, ``"APm"``, ``"APl"``, ``"AR1"``, ``"AR10"``,
    ``"AR100"``, ``"ARs"``, ``"ARm"``, ``"ARl"`` (floats in [0, 1], pycocotools' 12 numbers), ``"per_category"``
    ``{name: AP}`` and ``"num_images"``; the 12-line table is printed too. Under several processes (``accelerate
    launch``) the main process gets the dict and the others None.
    """
    check_evaluate_arguments(checkpoint, recipe, overrides, output_dir, "checkpoint")  # one line per bad argument
    weights = checkpoint_file(checkpoint)
    cfg = detector_recipe(recipe, weights, overrides)
    if output_dir is not None:
        make_output_dir(output_dir, "output_dir")
    return evaluate_checkpoint(cfg, weights, output_dir)
