"""Swin-L recipes equal the official DINO_4scale_swin.py (and its 5-level variant) field by field.

Expected values: ../shared/reference/dino_official_facts.md (recipes, denoising with the official training scripts'
overrides, loss and matching, optimisation, data, Swin-L backbone).
"""
from __future__ import annotations

import pytest

from dino.engine.recipe import iter_fields, load_recipe

OFFICIAL_SWINL = {
    # data: COCO, category ids as labels, the official multi-scale / crop augmentation and val resize
    "data.dataset": "coco",
    "data.label_mapping": "official",
    "data.num_classes": 91,
    "data.train_scales": tuple(range(480, 801, 32)),
    "data.train_max_size": 1333,
    "data.crop_resize_scales": (400, 500, 600),
    "data.crop_size": (384, 600),
    "data.val_scale": 800,
    "data.val_max_size": 1333,
    "data.size_divisibility": 1,
    # optimisation
    "optim.lr": 1e-4,
    "optim.lr_backbone": 1e-5,
    "optim.weight_decay": 1e-4,
    "optim.clip_max_norm": 0.1,
    "optim.lr_drop_factor": 0.1,
    "optim.total_batch_size": 16,
    "train.seed": 42,
    "train.mixed_precision": "no",
    "train.ema": False,
    # backbone swin_L_384_22k
    "model.backbone.name": "swin_large_patch4_window12_384",
    "model.backbone.pretrained": "timm",  # the ImageNet-22k weights (.ms_in22k)
    "model.backbone.drop_path_rate": 0.2,
    "model.backbone.gradient_checkpointing": True,  # use_checkpoint=True
    "model.backbone.freeze_stem_and_layer1": False,
    # transformer
    "model.transformer.hidden_dim": 256,
    "model.transformer.nheads": 8,
    "model.transformer.enc_layers": 6,
    "model.transformer.dec_layers": 6,
    "model.transformer.dim_feedforward": 2048,
    "model.transformer.dropout": 0.0,
    "model.transformer.enc_n_points": 4,
    "model.transformer.dec_n_points": 4,
    "model.transformer.num_queries": 900,
    "model.transformer.two_stage_bbox_size": 0.05,
    "model.transformer.pe_temperature": 20.0,
    # denoising, as every official training script sets it (dn_box_noise_scale 1.0)
    "model.denoising.enabled": True,
    "model.denoising.dn_number": 100,
    "model.denoising.label_noise_ratio": 0.5,
    "model.denoising.box_noise_scale": 1.0,
    "model.denoising.labelbook_size": 91,
    # matcher and loss
    "model.matcher.cost_class": 2.0,
    "model.matcher.cost_bbox": 5.0,
    "model.matcher.cost_giou": 2.0,
    "model.matcher.focal_alpha": 0.25,
    "model.loss.cls_loss_coef": 1.0,
    "model.loss.bbox_loss_coef": 5.0,
    "model.loss.giou_loss_coef": 2.0,
    "model.loss.interm_loss_coef": 1.0,
    "model.loss.dn_loss_coef": 1.0,
    "model.loss.focal_alpha": 0.25,
    "model.loss.focal_gamma": 2.0,
    "model.loss.aux_loss": True,
    "model.num_classes": 91,
    "model.num_select": 300,
}

SCHEDULES = {  # recipe: epochs, lr drop, feature levels, backbone stages, per-device cap (official images per GPU)
    "dino_swinl_4scale_12ep": (12, (11,), 4, (1, 2, 3), 2),
    "dino_swinl_4scale_36ep": (36, (30,), 4, (1, 2, 3), 2),
    "dino_swinl_5scale_12ep": (12, (11,), 5, (0, 1, 2, 3), 1),
    "dino_swinl_5scale_36ep": (36, (30,), 5, (0, 1, 2, 3), 1),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_swinl_recipe_equals_official_config(name):
    cfg = load_recipe(name)
    fields = dict(iter_fields(cfg))
    epochs, drop, levels, stages, cap = SCHEDULES[name]
    expected = dict(OFFICIAL_SWINL, **{
        "optim.epochs": epochs, "optim.lr_drop_epochs": drop, "model.transformer.num_feature_levels": levels,
        "model.backbone.return_levels": stages, "optim.batch_size_per_device": cap,
    })
    wrong = {k: (fields.get(k, "<no such field>"), v) for k, v in expected.items() if fields.get(k) != v}
    assert not wrong, f"{name}: field: (recipe, official) {wrong}"
    assert cfg.name == name
