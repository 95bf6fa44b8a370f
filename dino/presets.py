"""Model presets: the official DINO configurations and a small CPU-trainable one.

``get_preset(name)`` returns a fresh :class:`~dino.config.ModelConfig` (callers may modify it).
"""
from __future__ import annotations

from typing import Callable

from dino.config import BackboneConfig, DenoisingConfig, MatcherConfig, ModelConfig, TransformerConfig

# The official models' head: COCO category ids are the labels (max id 90), label book the same size.
COCO_NUM_CLASSES = 91


def dino_r50_4scale() -> ModelConfig:
    """Official DINO-4scale R50: C3-C5 + one extra level, 900 queries, 91 COCO classes (46,893,182 params)."""
    return ModelConfig(backbone=BackboneConfig(name="resnet50", return_levels=(1, 2, 3)),
                       transformer=TransformerConfig(num_feature_levels=4), num_classes=COCO_NUM_CLASSES)


def dino_r50_5scale() -> ModelConfig:
    """Official DINO-5scale R50: C2-C5 + one extra level."""
    return ModelConfig(backbone=BackboneConfig(name="resnet50", return_levels=(0, 1, 2, 3)),
                       transformer=TransformerConfig(num_feature_levels=5), num_classes=COCO_NUM_CLASSES)


def _swin_large(return_levels: tuple[int, ...]) -> BackboneConfig:
    # The official swin_L_384_22k backbone (dino/models/swin.py): window 12, stochastic depth 0.2, all stages train,
    # activation checkpointing on (DINO_4scale_swin.py: use_checkpoint=True).
    return BackboneConfig(name="swin_large_patch4_window12_384", return_levels=return_levels,
                          freeze_stem_and_layer1=False, gradient_checkpointing=True, drop_path_rate=0.2)


def dino_swinl_4scale() -> ModelConfig:
    """Official DINO-4scale Swin-L (384, window 12): stages 1-3 + one extra level (217,230,066 params)."""
    return ModelConfig(backbone=_swin_large((1, 2, 3)), transformer=TransformerConfig(num_feature_levels=4),
                       num_classes=COCO_NUM_CLASSES)


def dino_swinl_5scale() -> ModelConfig:
    """Official DINO-5scale Swin-L: stages 0-3 + one extra level (217,576,690 params)."""
    return ModelConfig(backbone=_swin_large((0, 1, 2, 3)), transformer=TransformerConfig(num_feature_levels=5),
                       num_classes=COCO_NUM_CLASSES)


# ---------------------------------------------------------------------------------------------------------------
# Quickstart preset: tuned for CPU training from scratch on the synthetic 3-class "shapes" dataset.
# The engine owner tunes this function; the official presets above stay as they are.
# ---------------------------------------------------------------------------------------------------------------
def dino_quickstart() -> ModelConfig:
    """Small DINO for the 3-class shapes dataset, trained from scratch on a CPU by ``python -m dino.quickstart``.

    The shapes' category ids 1-3 are the labels, hence 4 classes (label 0 is never a target), as COCO's 91.

    timm ResNet-18 with ordinary (trainable) BatchNorm: from random weights it learns much faster than the official
    FrozenBatchNorm ResNet, whose frozen statistics are meaningless without pretraining (CPU sweep: AP50 0.91 vs 0.56
    after 30 epochs of 64 px images). timm's feature indices 1-2 are strides 4/8, plus the extra stride-16 level:
    the stride-4 level is what gets small shapes' classes right early, and leaving out ResNet layer 3 and all but one
    encoder layer pays for its 256 tokens at 64 px. Six decoder layers (the official depth): depth is what teaches
    the queries not to report an object twice sooner. What pays for them: hidden 128, feed-forward width 128,
    2 sampling points per head and level, 30 queries (at most 4 objects per image) and 2 denoising groups
    (``dn_number`` 8). A matching class cost of 4 (official: 2) makes the assignment favour the query that already
    scores an object highest; it learned not to report objects twice sooner (after 4 epochs: 41 duplicates among the
    top 161 detections against 101, AP50 0.685 against 0.405)
    (docs/training.md, fifth round).
    """
    return ModelConfig(
        backbone=BackboneConfig(name="timm:resnet18", return_levels=(1, 2), freeze_stem_and_layer1=False),
        transformer=TransformerConfig(hidden_dim=128, nheads=8, enc_layers=1, dec_layers=6, dim_feedforward=128,
                                      num_feature_levels=3, enc_n_points=2, dec_n_points=2, num_queries=30),
        denoising=DenoisingConfig(dn_number=8),
        matcher=MatcherConfig(cost_class=4.0),
        num_classes=4,
        num_select=30,
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "dino_r50_4scale": dino_r50_4scale,
    "dino_r50_5scale": dino_r50_5scale,
    "dino_swinl_4scale": dino_swinl_4scale,
    "dino_swinl_5scale": dino_swinl_5scale,
    "dino_quickstart": dino_quickstart,
}


def get_preset(name: str) -> ModelConfig:
    """Returns a new ModelConfig for preset ``name``; ValueError listing the known names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()
