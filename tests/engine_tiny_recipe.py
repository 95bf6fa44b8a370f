"""A tiny recipe for the engine tests: a small DINO (timm ResNet-18, hidden 64) on 64 px shapes images, no download.

Tests pass ``--set data.root=... train.output_dir=...`` (or the same overrides to load_recipe).
"""
from dino.config import DataConfig, Recipe
from dino.presets import get_preset


def recipe() -> Recipe:
    cfg = Recipe(name="engine_tiny")
    cfg.model = get_preset("dino_quickstart")
    cfg.model.backbone.return_levels = (2, 3)  # strides 8/16/32: a quarter of the tokens of the preset's stride 4
    t = cfg.model.transformer
    t.hidden_dim, t.nheads, t.enc_layers, t.dec_layers, t.dim_feedforward, t.num_queries = 64, 2, 1, 2, 64, 20
    t.enc_n_points = t.dec_n_points = 2
    cfg.model.denoising.dn_number = 6
    cfg.model.num_select = 20
    cfg.data = DataConfig(
        dataset="shapes", root="data/shapes_tiny", shapes_image_size=64, shapes_train_images=8, shapes_val_images=5,
        train_scales=(64,), train_max_size=64, crop_resize_scales=(64,), crop_size=(48, 64), val_scale=64,
        val_max_size=64, num_workers=0,
    )
    cfg.optim.lr = cfg.optim.lr_backbone = 1e-3
    cfg.optim.epochs = 2
    cfg.optim.lr_drop_epochs = (2,)
    cfg.optim.total_batch_size = 4
    cfg.optim.batch_size_per_device = 2
    cfg.train.tracker = None
    cfg.train.checkpoint_every_steps = 1
    cfg.train.eval_every_epochs = 0
    cfg.train.log_every_steps = 1
    cfg.train.seed = 0
    return cfg
