"""DINO Swin-L (384, ImageNet-22k) 5-scale, 36 epochs (LR drop after epoch 30), official 58.5 AP.

The official DINO_4scale_swin.py with 5 feature levels (backbone stages 0-3): the R50 recipe's data, optimiser and
loss settings, backbone swin_L_384_22k starting from the ImageNet-22k weights (timm's ``.ms_in22k``; or set
``model.backbone.pretrained`` to a local swin_large_patch4_window12_384_22k.pth), activation checkpointing on.
"""
from dino_r50_4scale_12ep import coco_recipe


def recipe():
    cfg = coco_recipe("dino_swinl_5scale", epochs=36, batch_size_per_device=1)  # official 1 x 16 GPUs
    cfg.model.backbone.pretrained = "timm"
    return cfg
