"""DINO Swin-L (384, ImageNet-22k) 4-scale, 12 epochs (LR drop after epoch 11), official 56.8 AP.

The official DINO_4scale_swin.py: the R50 recipe's data, optimiser and loss settings,
backbone swin_L_384_22k starting from the ImageNet-22k weights (timm's ``.ms_in22k``; or set
``model.backbone.pretrained`` to a local swin_large_patch4_window12_384_22k.pth), activation checkpointing on.
"""
from dino_r50_4scale_12ep import coco_recipe


def recipe():
    cfg = coco_recipe("dino_swinl_4scale", epochs=12, batch_size_per_device=2)  # official 2 x 8 GPUs
    cfg.model.backbone.pretrained = "timm"
    return cfg
