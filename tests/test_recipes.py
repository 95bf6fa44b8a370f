"""Every official recipe against the official values (/work/shared/reference/dino_official_facts.md), field by field.

Table-driven: ``COMMON`` holds what every official COCO recipe shares, ``RECIPES`` what one recipe adds or changes
(field path -> expected value). Add a recipe by adding a row; a field missing from the recipe fails the test.
"""
import copy

import pytest
from torchvision.transforms import v2

from dino.data import build_transforms, fit_num_classes
from dino.data.transforms import RandomResize, RandomSizeCrop
from dino.engine.recipe import iter_fields, load_recipe
from dino.models.dino import check_label_book

COMMON = {
    # Data: COCO, category ids as labels; the official multi-scale augmentation and val size.
    "data.dataset": "coco",
    "data.train_scales": (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
    "data.train_max_size": 1333,
    "data.crop_resize_scales": (400, 500, 600),
    "data.crop_size": (384, 600),
    "data.val_scale": 800,
    "data.val_max_size": 1333,
    "data.size_divisibility": 1,
    # Model: 91 classes, 900 queries, num_select 300, the shared transformer.
    "model.num_classes": 91,
    "model.num_select": 300,
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
    # Denoising: budget 100, label noise 0.5, box noise 1.0 (the training scripts' value, not the configs' 0.4).
    "model.denoising.enabled": True,
    "model.denoising.dn_number": 100,
    "model.denoising.label_noise_ratio": 0.5,
    "model.denoising.box_noise_scale": 1.0,
    # Matcher and loss coefficients.
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
    # Optimisation: AdamW lr 1e-4, backbone 1e-5, weight decay 1e-4, clip 0.1, one x0.1 drop, batch 16.
    "optim.lr": 1e-4,
    "optim.lr_backbone": 1e-5,
    "optim.weight_decay": 1e-4,
    "optim.clip_max_norm": 0.1,
    "optim.lr_drop_factor": 0.1,
    "optim.total_batch_size": 16,
    "train.seed": 42,
    "train.mixed_precision": "no",
    "train.ema": False,
}

R50 = {
    "model.backbone.name": "resnet50",
    "model.backbone.pretrained": "torchvision",  # ImageNet-1k, as the official runs
    "model.backbone.freeze_stem_and_layer1": True,
    "model.backbone.gradient_checkpointing": False,
}
R50_4SCALE = {**R50, "model.backbone.return_levels": (1, 2, 3), "model.transformer.num_feature_levels": 4,
              "optim.batch_size_per_device": 2}  # official 2 x 8 GPUs
R50_5SCALE = {**R50, "model.backbone.return_levels": (0, 1, 2, 3), "model.transformer.num_feature_levels": 5,
              "optim.batch_size_per_device": 1}  # official 1 x 16 GPUs
# Schedules: 12 epochs drop after 11, 24 after 20, 36 after 30.
SCHEDULE = {12: {"optim.epochs": 12, "optim.lr_drop_epochs": (11,)},
            24: {"optim.epochs": 24, "optim.lr_drop_epochs": (20,)},
            36: {"optim.epochs": 36, "optim.lr_drop_epochs": (30,)}}

# Swin-L: DINO_4scale_swin.py (backbone swin_L_384_22k, use_checkpoint=True); 5-scale: stages 0-3, 5 levels.
SWINL = {
    "model.backbone.name": "swin_large_patch4_window12_384",
    "model.backbone.pretrained": "timm",  # timm's .ms_in22k: the ImageNet-22k weights, as the official runs
    "model.backbone.drop_path_rate": 0.2,
    "model.backbone.freeze_stem_and_layer1": False,  # official frozen_stages=-1: every stage trains
    "model.backbone.gradient_checkpointing": True,
}
SWINL_4SCALE = {**SWINL, "model.backbone.return_levels": (1, 2, 3), "model.transformer.num_feature_levels": 4,
                "optim.batch_size_per_device": 2}  # official 2 x 8 GPUs
SWINL_5SCALE = {**SWINL, "model.backbone.return_levels": (0, 1, 2, 3), "model.transformer.num_feature_levels": 5,
                "optim.batch_size_per_device": 1}

RECIPES = {
    "dino_r50_4scale_12ep": {**R50_4SCALE, **SCHEDULE[12]},
    "dino_r50_4scale_24ep": {**R50_4SCALE, **SCHEDULE[24]},
    "dino_r50_4scale_36ep": {**R50_4SCALE, **SCHEDULE[36]},
    "dino_r50_5scale_12ep": {**R50_5SCALE, **SCHEDULE[12]},
    "dino_r50_5scale_24ep": {**R50_5SCALE, **SCHEDULE[24]},
    "dino_r50_5scale_36ep": {**R50_5SCALE, **SCHEDULE[36]},
    "dino_swinl_4scale_12ep": {**SWINL_4SCALE, **SCHEDULE[12]},
    "dino_swinl_4scale_36ep": {**SWINL_4SCALE, **SCHEDULE[36]},
    "dino_swinl_5scale_12ep": {**SWINL_5SCALE, **SCHEDULE[12]},
    "dino_swinl_5scale_36ep": {**SWINL_5SCALE, **SCHEDULE[36]},
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_matches_the_official_values(name):
    cfg = load_recipe(name)
    fields = dict(iter_fields(cfg))
    expected = {**COMMON, **RECIPES[name]}
    mismatched = {path: (fields.get(path, "<missing>"), value) for path, value in expected.items()
                  if fields.get(path, "<missing>") != value}
    assert not mismatched, f"{name}: field: (recipe, official) {mismatched}"
    assert cfg.name == name
    # The label book the model builds: official dn_labelbook_size 91 (label_enc 92 rows), also once fitted to COCO.
    assert check_label_book(cfg.model) == 91
    assert fit_num_classes(copy.deepcopy(cfg.model), 91).denoising.labelbook_size == 91


def _resizes(transform) -> list:
    """The RandomResize / RandomSizeCrop steps of a v2 pipeline, depth first."""
    if isinstance(transform, (RandomResize, RandomSizeCrop)):
        return [transform]
    children = getattr(transform, "transforms", [])
    return [step for child in children for step in _resizes(child)]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_builds_the_official_augmentation(name):
    data = load_recipe(name).data
    multi, crop_resize, crop, multi_after_crop = _resizes(build_transforms(data, "train"))
    scales = list(range(480, 801, 32))
    assert (multi.sizes, multi.max_size) == (scales, 1333)
    assert (crop_resize.sizes, crop_resize.max_size) == ([400, 500, 600], None)
    assert (crop.min_size, crop.max_size) == (384, 600)
    assert (multi_after_crop.sizes, multi_after_crop.max_size) == (scales, 1333)
    train = build_transforms(data, "train").transforms
    flips = [t for t in train if isinstance(t, v2.RandomHorizontalFlip)]
    assert len(flips) == 1 and flips[0].p == 0.5
    choice = next(t for t in train if isinstance(t, v2.RandomChoice))
    assert choice.p == [0.5, 0.5]
    (val,) = _resizes(build_transforms(data, "val"))
    assert (val.sizes, val.max_size) == ([800], 1333)
