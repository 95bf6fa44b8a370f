"""``build_dataset``: the dataset named by a :class:`~dino.config.DataConfig` for one split."""
from __future__ import annotations

from pathlib import Path

from dino.config import DataConfig
from dino.data.coco import CocoDetection
from dino.data.shapes import generate_shapes_dataset
from dino.data.transforms import build_transforms
from dino.errors import UserError

__all__ = ["DATASETS", "build_dataset", "prepare_dataset", "split_paths"]

DATASETS = ("shapes", "coco")


def split_paths(data_cfg: DataConfig, split: str) -> tuple[Path, Path]:
    """(images folder, annotations json) of ``split``; relative config paths are relative to ``data_cfg.root``."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(data_cfg.root)
    images = Path(data_cfg.train_images if split == "train" else data_cfg.val_images)
    annotations = Path(data_cfg.train_annotations if split == "train" else data_cfg.val_annotations)
    return (images if images.is_absolute() else root / images), (
        annotations if annotations.is_absolute() else root / annotations
    )


def build_dataset(data_cfg: DataConfig, split: str) -> CocoDetection:
    """The ``split`` ("train" or "val") dataset with the official transforms at the configured scales.

    ``dataset="shapes"`` generates the synthetic dataset into ``data_cfg.root`` first (a no-op when it is there);
    ``dataset="coco"`` reads any COCO-format dataset. Labels are category ids: ``dataset.num_classes`` is the max
    category id + 1 (``dino.data.fit_num_classes`` applies it to the model config).
    """
    prepare_dataset(data_cfg)
    images, annotations = split_paths(data_cfg, split)
    return CocoDetection(
        images,
        annotations,
        transforms=build_transforms(data_cfg, split),
        skip_unreadable=data_cfg.skip_unreadable,
    )


def prepare_dataset(data_cfg: DataConfig) -> None:
    """Checks ``data.dataset``; for ``"shapes"`` generates the synthetic dataset into ``data_cfg.root`` (a no-op when
    it is there)."""
    if data_cfg.dataset not in DATASETS:
        raise UserError(f"data.dataset must be one of {DATASETS}, got {data_cfg.dataset!r}")
    if data_cfg.dataset == "shapes":
        generate_shapes_dataset(
            data_cfg.root,
            data_cfg.shapes_train_images,
            data_cfg.shapes_val_images,
            data_cfg.shapes_image_size,
            seed=data_cfg.shapes_seed,
            val_image_size=data_cfg.shapes_val_image_size,
        )
