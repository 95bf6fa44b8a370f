"""Model + criterion end to end in training mode: every loss term, and gradients exactly where they belong."""
from __future__ import annotations

import torch

from dino.criterion import build_criterion
from dino.models.dino import DINO
from tests.test_model import batch, targets, tiny_config


def test_train_losses_cover_every_layer_and_gradients_reach_all_trainable_parameters():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = DINO(cfg).train()
    criterion = build_criterion(cfg)
    images, mask = batch()
    losses = criterion(model(images, mask, targets()), targets())

    dec_layers = cfg.transformer.dec_layers
    suffixes = [""] + [f"_{i}" for i in range(dec_layers - 1)] + ["_interm"]
    for suffix in suffixes:
        for term in ("loss_ce", "loss_bbox", "loss_giou"):
            assert torch.isfinite(losses[term + suffix]), term + suffix
    for suffix in [""] + [f"_{i}" for i in range(dec_layers - 1)]:
        for term in ("loss_ce_dn", "loss_bbox_dn", "loss_giou_dn"):
            name = term + suffix
            assert torch.isfinite(losses[name]) and losses[name].item() > 0, name

    total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    total.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    no_grad = [n for n, p in trainable.items() if p.grad is None]
    assert not no_grad, f"trainable parameters without a gradient: {no_grad}"
    bad = [n for n, p in trainable.items() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"
    # The official backbone freezes the stem and layer1; FrozenBatchNorm has no parameters at all.
    assert any(n.startswith("backbone.") and ("conv1" in n or "layer1" in n) for n in frozen)
    assert all(p.grad is None for p in frozen.values())
    assert not any("layer1" in n for n in trainable if n.startswith("backbone."))
