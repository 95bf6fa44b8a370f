"""DINO R50 4-scale, 36 epochs, LR drop after epoch 30 (official: 50.9 AP)."""
from dino_r50_4scale_12ep import recipe as base, with_schedule


def recipe():
    return with_schedule(base(), 36)
