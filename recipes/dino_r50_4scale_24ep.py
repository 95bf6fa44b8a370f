"""DINO R50 4-scale, 24 epochs (LR drop after epoch 20), official 50.4 AP."""
from dino_r50_4scale_12ep import coco_recipe


def recipe():
    return coco_recipe("dino_r50_4scale", epochs=24, batch_size_per_device=2)
