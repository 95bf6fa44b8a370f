"""DINO R50 5-scale (C2-C5 + extra level), 12 epochs (LR drop after epoch 11), official 49.4 AP."""
from dino_r50_4scale_12ep import coco_recipe


def recipe():
    return coco_recipe("dino_r50_5scale", epochs=12, batch_size_per_device=1)  # official 1 x 16 GPUs
