"""AdamW with the official parameter groups and the step learning-rate schedule."""
from __future__ import annotations

import torch
from torch import nn

from dino.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Splits trainable parameters into the official two groups: names containing "backbone" get ``lr_backbone``.

    With ``lr_backbone <= 0`` the backbone is frozen (official: the backbone trains only when lr_backbone > 0).
    Weight decay applies to every parameter, as in the official code.
    """
    backbone, rest = [], []
    for name, param in model.named_parameters():
        if "backbone" in name:
            if cfg.lr_backbone <= 0:
                param.requires_grad_(False)
            if param.requires_grad:
                backbone.append(param)
        elif param.requires_grad:
            rest.append(param)
    groups = [{"params": rest, "lr": cfg.lr, "name": "default"}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr_backbone, "name": "backbone"})
    return groups


_FUSED_DEVICES = {"cpu", "cuda"}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; the fused (one kernel per step) implementation where the parameters allow it.

    Fused made a whole quickstart training step (batch 8) 1.1-1.3x faster on a 2-core CPU than the default for-each
    implementation (three alternating pairs of 12-step means); both compute the same update up to float rounding.
    """
    groups = param_groups(model, cfg)
    # Trainable parameters are floating point by construction; only the device can rule fused out.
    fused = all(p.device.type in _FUSED_DEVICES for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.MultiStepLR:
    """MultiStepLR stepped once per epoch: lr x ``lr_drop_factor`` after each epoch in ``lr_drop_epochs``."""
    bad = [e for e in cfg.lr_drop_epochs if not 0 < e <= cfg.epochs]
    if bad:
        raise ValueError(f"optim.lr_drop_epochs {cfg.lr_drop_epochs}: {bad} outside 1..optim.epochs={cfg.epochs}")
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.lr_drop_epochs), gamma=cfg.lr_drop_factor)
