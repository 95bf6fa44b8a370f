"""DINO Swin-L (384, ImageNet-22k) 4-scale, 36 epochs (LR drop after epoch 30), official 58.0 AP."""
from dino_r50_4scale_12ep import coco_recipe


def recipe():
    return coco_recipe("dino_swinl_4scale", epochs=36, batch_size_per_device=2)
