"""DINO R50 4-scale, 24 epochs, LR drop after epoch 20 (official: 50.4 AP)."""
from dino_r50_4scale_12ep import recipe as base, with_schedule


def recipe():
    return with_schedule(base(), 24)
