"""DINO R50 5-scale, 12 epochs: the official DINO_5scale.py (49.4 AP). Adds the stride-4 C2 level."""
from dino_r50_4scale_12ep import recipe as r50_4scale, with_schedule


def five_scale(cfg):
    """C2..C5 plus the extra stride-64 level; one image per device, as the official 1 x 16 GPUs."""
    cfg.model.backbone.return_levels = (0, 1, 2, 3)
    cfg.model.transformer.num_feature_levels = 5
    cfg.optim.total_batch_size = 16
    cfg.optim.batch_size_per_device = 1
    cfg.name = cfg.name.replace("4scale", "5scale")
    cfg.train.output_dir = f"outputs/{cfg.name}"
    return cfg


def recipe():
    return five_scale(r50_4scale())
