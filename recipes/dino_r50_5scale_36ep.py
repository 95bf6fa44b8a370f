"""DINO R50 5-scale, 36 epochs, LR drop after epoch 30 (official: 51.2 AP)."""
from dino_r50_5scale_12ep import recipe as base
from dino_r50_4scale_12ep import with_schedule


def recipe():
    return with_schedule(base(), 36)
