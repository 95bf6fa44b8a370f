"""Data: COCO-format datasets, the official v2 augmentations, the synthetic shapes dataset, batching and COCO AP.

Typical use::

    train_set = build_dataset(recipe.data, "train")
    fit_num_classes(recipe.model, train_set.num_classes, str(train_set.annotations_file))  # None -> the dataset's
    loader = DataLoader(train_set, batch_size=2, shuffle=True,
                        collate_fn=partial(collate_fn, size_divisibility=recipe.data.size_divisibility))
    images, mask, targets = next(iter(loader))
    ...
    preds = predictions_to_coco(postprocessed, [t["image_id"] for t in targets], val_set.label_to_category_id)
    stats = evaluate_coco(coco_gt(val_set), preds); print(format_ap_table(stats))
    print(format_per_category(stats["per_category"]))  # {name: AP, or None without ground truth}
"""
from dino.data.build import build_dataset, prepare_dataset, split_paths
from dino.data.classes import fit_num_classes
from dino.data.coco import (
    CocoDetection,
    ImageError,
    UnreadableImageError,
    box_problem,
    load_instances_json,
    read_categories,
)
from dino.data.coco_eval import (
    STAT_NAMES,
    coco_gt,
    evaluate_coco,
    format_ap_table,
    format_per_category,
    ground_truth_counts,
    label_to_category,
    predictions_to_coco,
)
from dino.data.collate import Batch, collate_fn, pad_images
from dino.data.shapes import generate_shapes_dataset
from dino.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms

__all__ = [
    "Batch",
    "CocoDetection",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageError",
    "STAT_NAMES",
    "UnreadableImageError",
    "box_problem",
    "build_dataset",
    "build_transforms",
    "coco_gt",
    "collate_fn",
    "evaluate_coco",
    "fit_num_classes",
    "format_ap_table",
    "format_per_category",
    "generate_shapes_dataset",
    "ground_truth_counts",
    "label_to_category",
    "load_instances_json",
    "pad_images",
    "predictions_to_coco",
    "prepare_dataset",
    "read_categories",
    "split_paths",
]
