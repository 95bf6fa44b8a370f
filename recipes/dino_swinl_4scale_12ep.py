"""DINO Swin-L (384, ImageNet-22k) 4-scale, 12 epochs: the official DINO_4scale_swin.py (56.8 AP)."""
from dino_r50_4scale_12ep import recipe as r50_4scale, with_schedule


def swin_large(cfg):
    """Swin-L backbone from timm (stages 1..3), gradient checkpointing on as in the official config."""
    cfg.model.backbone.name = "timm:swin_large_patch4_window12_384"
    cfg.model.backbone.pretrained = "timm"
    cfg.model.backbone.return_levels = (1, 2, 3)
    cfg.model.backbone.freeze_stem_and_layer1 = False  # ResNet-only freezing; all Swin stages train
    cfg.model.backbone.gradient_checkpointing = True
    cfg.name = cfg.name.replace("r50", "swinl")
    cfg.train.output_dir = f"outputs/{cfg.name}"
    return cfg


def recipe():
    return with_schedule(swin_large(r50_4scale()), 12)
