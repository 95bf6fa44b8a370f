"""DINO, ResNet-50, 4 scales, 12 epochs: the official DINO_4scale.py (49.0 AP on COCO val2017).

The other COCO recipes are this one with another preset and/or schedule (``coco_recipe``). Data: a COCO 2017 folder
(``--set data.root=/data/coco``) with train2017/, val2017/ and annotations/instances_{train,val}2017.json.
"""
from dino.config import DataConfig, Recipe
from dino.presets import get_preset

# Epochs after which the learning rate drops x0.1, per schedule length (paper / official scripts).
LR_DROP = {12: (11,), 24: (20,), 36: (30,)}


def coco_data(root: str = "data/coco") -> DataConfig:
    """COCO 2017 with the official augmentation; category ids are the labels (max id 90 + 1 = the preset's 91 classes).

    On another dataset set ``model.num_classes=None`` to size the head from its annotations."""
    return DataConfig(
        dataset="coco",
        root=root,
        train_images="train2017",
        train_annotations="annotations/instances_train2017.json",
        val_images="val2017",
        val_annotations="annotations/instances_val2017.json",
    )


def coco_recipe(preset: str, epochs: int, batch_size_per_device: int) -> Recipe:
    """The official COCO training of model ``preset`` for ``epochs`` (12/24/36) epochs at total batch 16."""
    cfg = Recipe(name=f"{preset}_{epochs}ep")
    cfg.model = get_preset(preset)
    # ImageNet backbones as the official runs: torchvision ResNet-50 (1k), timm Swin-L 384 (22k).
    cfg.model.backbone.pretrained = "timm" if cfg.model.backbone.name.startswith("timm:") else "torchvision"
    cfg.data = coco_data()
    cfg.optim.lr = 1e-4
    cfg.optim.lr_backbone = 1e-5
    cfg.optim.weight_decay = 1e-4
    cfg.optim.clip_max_norm = 0.1
    cfg.optim.epochs = epochs
    cfg.optim.lr_drop_epochs = LR_DROP[epochs]
    cfg.optim.lr_drop_factor = 0.1
    cfg.optim.total_batch_size = 16
    # At most this many images per device; with fewer processes than the official GPUs, gradients accumulate.
    cfg.optim.batch_size_per_device = batch_size_per_device
    cfg.train.seed = 42
    cfg.train.mixed_precision = "no"
    cfg.train.ema = False
    cfg.train.output_dir = f"outputs/{cfg.name}"
    return cfg


def recipe() -> Recipe:
    return coco_recipe("dino_r50_4scale", epochs=12, batch_size_per_device=2)  # official 2 x 8 GPUs
