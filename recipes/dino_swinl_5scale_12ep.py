"""DINO Swin-L (384, ImageNet-22k) 5-scale, 12 epochs (LR drop after epoch 11), official 57.3 AP."""
from dino_r50_4scale_12ep import coco_recipe


def recipe():
    return coco_recipe("dino_swinl_5scale", epochs=12, batch_size_per_device=1)
