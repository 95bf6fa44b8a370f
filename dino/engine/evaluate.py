"""Distributed COCO evaluation: every process predicts its shard, AP is computed once on the main process.

Accelerate pads the last shard with repeated images so all processes run the same number of batches; predictions
are gathered as Python objects and de-duplicated by image id, so each validation image counts exactly once.
"""
from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dino.config import Recipe
from dino.durable import replace_durably, write_json
from dino.engine.bad_images import agreed_batches
from dino.engine.setup import build_accelerator, fit_classes_to
from dino.engine.termination import data_worker_init
from dino.errors import UserError
from dino.model_loading import build_model_from_checkpoint
from dino.models.memory import check_resize_fits
from dino.plots.pr_curves import PR_CURVES_PNG, plot_pr_curves

logger = logging.getLogger("dino.engine")


def unpack_batch(batch) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """``(images (B,3,H,W), mask (B,H,W) bool, targets)`` from a :class:`dino.data.Batch` (or any 3-sequence)."""
    images, mask, targets = batch
    return images, mask, targets


def build_val_loader(dataset: Dataset, cfg: Recipe) -> DataLoader:
    """The evaluation loader: ``train.eval_batch_size`` images per batch (1: no padding across images), in order."""
    from dino.data import collate_fn

    if cfg.train.eval_batch_size < 1:
        raise UserError(f"train.eval_batch_size must be >= 1, got {cfg.train.eval_batch_size} (1 evaluates each image "
                        "alone, as the official code)")
    return DataLoader(
        dataset,
        batch_size=cfg.train.eval_batch_size,
        shuffle=False,
        collate_fn=partial(collate_fn, size_divisibility=cfg.data.size_divisibility),
        num_workers=cfg.data.num_workers,
        generator=torch.Generator(),  # keeps evaluation from drawing on the global RNG (exact resumption)
        worker_init_fn=data_worker_init(cfg.train.termination_signals),  # a signal waits for its end
    )


@torch.no_grad()
def predict(accelerator: Accelerator, model: torch.nn.Module, postprocess, loader) -> list[dict]:
    """This process's predictions: ``[{"image_id", "scores", "labels", "boxes" xyxy pixels of the original image}]``."""
    model.eval()
    records = []
    # An image a process cannot load stops every process at the same batch (bad_images.agreed_batches).
    for batch in tqdm(agreed_batches(accelerator, loader), total=len(loader), desc="eval", unit="batch",
                      disable=not accelerator.is_local_main_process, dynamic_ncols=True):
        images, mask, targets = unpack_batch(batch)
        with accelerator.autocast():
            outputs = model(images, mask)
        outputs = {k: outputs[k].float() for k in ("pred_logits", "pred_boxes")}
        sizes = torch.stack([t["orig_size"] for t in targets]).to(outputs["pred_boxes"].device)
        for target, result in zip(targets, postprocess(outputs, sizes)):
            records.append({"image_id": int(target["image_id"]), **{k: v.cpu() for k, v in result.items()}})
    return records


def gather_predictions(accelerator: Accelerator, records: list[dict]) -> list[dict]:
    """All processes' records, one per image id (padding duplicates dropped), sorted by image id."""
    if accelerator.num_processes > 1:
        records = gather_object(records)
    unique = {}
    for record in records:
        unique.setdefault(record["image_id"], record)
    return [unique[k] for k in sorted(unique)]


def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    postprocess,
    loader,
    dataset: Dataset,
    output_dir: str | Path | None = None,
    pr_curves: bool = False,
) -> dict | None:
    """COCO box AP of ``model`` on ``dataset`` (whose prepared loader is ``loader``); call on every process.

    Returns :func:`score`'s stats on the main process, None elsewhere.
    """
    records = gather_predictions(accelerator, predict(accelerator, model, postprocess, loader))
    stats = score(records, dataset, output_dir, pr_curves) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    return stats


def score(records: list[dict], dataset: Dataset, output_dir: str | Path | None = None,
          pr_curves: bool = False) -> dict:
    """COCO box AP of ``records`` (``[{"image_id", "scores" (K,), "labels" (K,), "boxes" (K, 4) xyxy pixels of the
    original image}]``, one per image, sorted by id) against ``dataset``'s ground truth: every model kind (PyTorch,
    exported artifacts) is scored here.

    Returns the 12 stats (``AP``, ``AP50``, ... as named by ``dino.data.STAT_NAMES``), ``per_category`` ({name: AP or
    None}) and ``num_images``. With ``output_dir``, writes ``results.json`` (stats) and ``predictions.json``
    (COCO-format detections of every image) there. ``pr_curves``: the stats also hold the precision-recall curves
    (``pr_curves``, see :func:`dino.data.evaluate_coco`).
    """
    from dino.data import coco_gt, evaluate_coco, label_to_category, predictions_to_coco

    ids = [r["image_id"] for r in records]
    detections = predictions_to_coco(records, ids, label_to_category(dataset))
    stats = {**evaluate_coco(coco_gt(dataset), detections, image_ids=ids, pr_curves=pr_curves),
             "num_images": len(ids)}
    if len(ids) != len(dataset):
        logger.warning("evaluated %d images but the validation set has %d", len(ids), len(dataset))
    if output_dir is not None:
        output_dir = Path(output_dir)
        # The curves' 1,300 numbers are drawn (pr_curves.png), not written: results.json stays readable.
        write_json({k: v for k, v in stats.items() if k != "pr_curves"}, output_dir / "results.json")
        _write_predictions(detections, output_dir / "predictions.json")
    return stats


def _write_predictions(detections: list[dict], path: Path) -> None:
    # Written compactly: COCO val gives 5000 x 300 detections.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(detections, f, separators=(",", ":"))
    replace_durably(tmp, path)


def checkpoint_weights(path: str | Path) -> Path:
    """The weights file of ``path``: the file itself, or ``model.safetensors`` of a checkpoint or output folder."""
    path = Path(path)
    if path.is_dir():
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise UserError(f"--checkpoint {path}: a folder must be a training checkpoint or output folder holding "
                            "model.safetensors, and this one has none")
        return weights
    if not path.exists():
        raise UserError(f"--checkpoint {path} does not exist")
    return path


def validation_set(cfg: Recipe) -> Dataset:
    """The recipe's validation set (a shapes recipe generates it first, saying where); UserError when it has no
    ground-truth boxes (every AP would be undefined)."""
    from dino.data import build_dataset, ground_truth_counts

    dataset = build_dataset(cfg.data, "val")
    if not any(ground_truth_counts(dataset.coco).values()):
        raise UserError(f"{dataset.annotations_file} has no ground-truth boxes to evaluate against (no annotations, "
                        "or only crowd or dropped ones); use `dino predict` for predictions without ground truth")
    return dataset


def report(stats: dict, model: str, cfg: Recipe, output_dir: str | Path | None) -> None:
    """Prints the 12-line COCO AP table and the AP of each category of ``model`` (its name in words); with
    ``output_dir``, draws ``pr_curves.png`` beside ``results.json``."""
    from dino.data import format_ap_table, format_per_category

    print(f"{model} on {stats['num_images']} images of {cfg.data.root} ({cfg.data.val_annotations}):")
    print(format_ap_table(stats))
    print(format_per_category(stats["per_category"]))
    if output_dir is not None:
        pictures = plot_pr_curves(stats["pr_curves"], Path(output_dir) / PR_CURVES_PNG,
                                  f"{model} on {stats['num_images']} images of {cfg.data.root}")
        print(f"results: {Path(output_dir) / 'results.json'}; precision-recall curves (all categories and the "
              f"{len(pictures.categories)} largest): {Path(output_dir) / PR_CURVES_PNG}")


def evaluate_checkpoint(cfg, checkpoint: str | Path, output_dir: str | Path | None = None) -> dict | None:
    """Loads ``checkpoint`` (our safetensors, an official .pth, or a checkpoint folder) and evaluates it.

    The backbone is built without pretrained weights: the checkpoint replaces them, so nothing is downloaded.
    Prints the 12-line COCO AP table and the AP of each category on the main process and returns the stats there
    (None elsewhere); with ``output_dir``, draws ``pr_curves.png`` beside ``results.json``. A validation set without
    ground-truth boxes is refused (every AP would be undefined).
    """
    from dino.postprocess import PostProcess

    weights = checkpoint_weights(checkpoint)
    accelerator = build_accelerator(cfg, use_trackers=False)
    dataset = validation_set(cfg)
    fit_classes_to(cfg, dataset)
    model = build_model_from_checkpoint(cfg.model, weights)  # never downloads backbone weights
    check_resize_fits(model, cfg.data.val_scale, cfg.data.val_max_size, cfg.train.eval_batch_size, accelerator.device)
    model, loader = accelerator.prepare(model, build_val_loader(dataset, cfg))
    stats = evaluate(accelerator, model, PostProcess(cfg.model.num_select), loader, dataset, output_dir,
                     pr_curves=True)
    if accelerator.is_main_process:
        report(stats, str(weights), cfg, output_dir)
    return stats
