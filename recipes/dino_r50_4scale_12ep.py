"""DINO, ResNet-50, 4 scales, 12 epochs: the official DINO_4scale.py (49.0 AP on COCO val2017).

The other COCO recipes build on this one. Data: a COCO 2017 folder (``--set data.root=/data/coco``) with
train2017/, val2017/ and annotations/instances_{train,val}2017.json.
"""
from dino.config import DataConfig, Recipe

# Epoch after which the learning rate drops x0.1, per schedule length (paper / official scripts).
LR_DROP = {12: (11,), 24: (20,), 36: (30,)}


def coco_data(root: str = "data/coco") -> DataConfig:
    """COCO 2017 with the official augmentation and category ids used directly as labels (91 classes)."""
    return DataConfig(
        dataset="coco",
        root=root,
        train_images="train2017",
        train_annotations="annotations/instances_train2017.json",
        val_images="val2017",
        val_annotations="annotations/instances_val2017.json",
        label_mapping="official",
        num_classes=91,
    )


def with_schedule(cfg: Recipe, epochs: int) -> Recipe:
    """The same recipe trained for ``epochs`` (12, 24 or 36) with the official LR drop; renames it accordingly."""
    cfg.optim.epochs = epochs
    cfg.optim.lr_drop_epochs = LR_DROP[epochs]
    cfg.name = cfg.name.rsplit("_", 1)[0] + f"_{epochs}ep"
    cfg.train.output_dir = f"outputs/{cfg.name}"
    return cfg


def recipe() -> Recipe:
    cfg = Recipe(name="dino_r50_4scale_12ep")  # dino.config defaults are the official R50 4-scale model
    cfg.model.backbone.pretrained = "torchvision"  # ImageNet-1k ResNet-50, as the official runs
    cfg.data = coco_data()
    cfg.optim.lr = 1e-4
    cfg.optim.lr_backbone = 1e-5
    cfg.optim.weight_decay = 1e-4
    cfg.optim.clip_max_norm = 0.1
    cfg.optim.total_batch_size = 16  # official: 2 images x 8 GPUs
    cfg.optim.batch_size_per_device = 2  # at most; fewer processes accumulate gradients instead
    cfg.train.seed = 42
    cfg.train.mixed_precision = "no"
    cfg.train.ema = False
    return with_schedule(cfg, 12)
