"""DINO Swin-L 5-scale, 12 epochs (official: 57.3 AP): Swin-L with all four stages plus the extra level."""
from dino_r50_4scale_12ep import recipe as r50_4scale
from dino_r50_5scale_12ep import five_scale
from dino_swinl_4scale_12ep import swin_large


def recipe():
    return five_scale(swin_large(r50_4scale()))
