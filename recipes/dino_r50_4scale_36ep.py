"""DINO R50 4-scale, 36 epochs (LR drop after epoch 30), official 50.9 AP."""
from dino_r50_4scale_12ep import coco_recipe


def recipe():
    return coco_recipe("dino_r50_4scale", epochs=36, batch_size_per_device=2)
