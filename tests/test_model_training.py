"""Model + criterion end to end in training mode: every loss term, and gradients exactly where they belong."""
from __future__ import annotations

import torch
from torch import nn

from dino.criterion import build_criterion
from dino.models.deformable_attention import MSDeformAttn
from dino.models.dino import DINO
from tests.test_model import batch, targets, tiny_config

# At the official initialisation these get an exactly zero gradient on the first step, and only these: the box MLPs'
# last layers start at zero (nothing flows back through them), and the positional level embedding reaches the loss
# only through the zero-initialised sampling-offset and attention-weight projections. One optimizer step later they
# all train (see the test with those layers perturbed).
ZERO_AT_INIT = {
    "transformer.level_embed",
    "bbox_embed.layers.0.weight", "bbox_embed.layers.0.bias",
    "bbox_embed.layers.1.weight", "bbox_embed.layers.1.bias",
    "transformer.enc_out_bbox_embed.layers.0.weight", "transformer.enc_out_bbox_embed.layers.0.bias",
    "transformer.enc_out_bbox_embed.layers.1.weight", "transformer.enc_out_bbox_embed.layers.1.bias",
}


def _backward(model: DINO, cfg) -> dict[str, torch.Tensor]:
    criterion = build_criterion(cfg)
    images, mask = batch()
    losses = criterion(model(images, mask, targets()), targets())
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    total.backward()
    return losses


def _zero_grad_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None and not p.grad.any()}


def test_train_losses_cover_every_layer_and_gradients_reach_all_trainable_parameters():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = DINO(cfg).train()
    losses = _backward(model, cfg)

    dec_layers = cfg.transformer.dec_layers
    suffixes = [""] + [f"_{i}" for i in range(dec_layers - 1)] + ["_interm"]
    for suffix in suffixes:
        for term in ("loss_ce", "loss_bbox", "loss_giou"):
            assert torch.isfinite(losses[term + suffix]), term + suffix
    for suffix in [""] + [f"_{i}" for i in range(dec_layers - 1)]:
        for term in ("loss_ce_dn", "loss_bbox_dn", "loss_giou_dn"):
            name = term + suffix
            assert torch.isfinite(losses[name]) and losses[name].item() > 0, name

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    no_grad = [n for n, p in trainable.items() if p.grad is None]
    assert not no_grad, f"trainable parameters without a gradient: {no_grad}"
    bad = [n for n, p in trainable.items() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"
    assert _zero_grad_names(model) == ZERO_AT_INIT
    # The label book: rows of classes (targets and the random replacement labels) learn; the extra row does not.
    rows = model.label_enc.weight.grad.abs().sum(1) > 0
    assert rows[[1, 2, 4]].all() and not rows[cfg.num_classes:].any()
    # The official backbone freezes the stem and layer1; FrozenBatchNorm has no parameters at all.
    assert any(n.startswith("backbone.") and ("conv1" in n or "layer1" in n) for n in frozen)
    assert all(p.grad is None for p in frozen.values())
    assert not any("layer1" in n for n in trainable if n.startswith("backbone."))


def test_every_trainable_parameter_gets_a_nonzero_gradient_once_the_zero_initialised_layers_moved():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = DINO(cfg).train()
    with torch.no_grad():  # what the first optimizer steps do to the layers that start at zero
        zero_init = [model.bbox_embed.layers[-1], model.transformer.enc_out_bbox_embed.layers[-1]]
        zero_init += [m.attention_weights for m in model.modules() if isinstance(m, MSDeformAttn)]
        zero_init += [m.sampling_offsets for m in model.modules() if isinstance(m, MSDeformAttn)]
        for layer in zero_init:
            layer.weight.normal_(0.0, 1e-3)
    _backward(model, cfg)
    assert not _zero_grad_names(model), f"trainable parameters with an all-zero gradient: {_zero_grad_names(model)}"
