"""DINO R50 5-scale (C2-C5 + extra level), 36 epochs (LR drop after epoch 30), official 51.2 AP."""
from dino_r50_4scale_12ep import coco_recipe


def recipe():
    return coco_recipe("dino_r50_5scale", epochs=36, batch_size_per_device=1)  # official 1 x 16 GPUs
