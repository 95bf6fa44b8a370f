"""DINO: DETR with Improved DeNoising Anchor Boxes (Zhang et al. 2022), parameter for parameter the official model."""
from __future__ import annotations

import copy

import torch
from torch import nn

from dino.config import ModelConfig
from dino.errors import UserError
from dino.models.anchors import inverse_sigmoid
from dino.models.backbone import Backbone
from dino.models.denoising import build_cdn_queries
from dino.models.mlp import MLP
from dino.models.position_encoding import PositionEmbeddingSine
from dino.models.transformer import DeformableTransformer, init_heads


def _nearest_indices(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """(out_size,) int64 source rows of PyTorch's ``nearest`` interpolation, with its float32 arithmetic:
    ``min(floor(i * float32(in_size / out_size)), in_size - 1)``."""
    i = torch.arange(out_size, dtype=torch.float32, device=device)
    if out_size == in_size:
        return i.long()
    if out_size == 2 * in_size:
        return i.long() // 2
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    return torch.floor(i * scale.to(device)).long().clamp(max=in_size - 1)


def _downsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) bool -> (B, h, w) bool: DETR's ``F.interpolate(mask[None].float(), size)`` (nearest), as a gather.

    The same rows and columns as F.interpolate, but exported as constant indices: ONNX Resize recomputes the scale as
    h / H and its inverse in floating point, and picks column 359 instead of 360 for 480 -> 8 (a padded image's last
    valid column at stride 64), so the exported graph saw padding as image.
    """
    rows = _nearest_indices(mask.shape[-2], int(size[0]), mask.device)
    cols = _nearest_indices(mask.shape[-1], int(size[1]), mask.device)
    return mask[:, rows][:, :, cols]


class DINO(nn.Module):
    """The detector. ``forward(images, mask, targets=None)``; see docs/ARCHITECTURE.md "Model I/O contract".

    The class and box heads are shared by all decoder layers (official ``dec_pred_*_embed_share``) and are
    registered once, as ``class_embed`` and ``bbox_embed``; ``dino.convert`` maps the official per-layer aliases.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        t = cfg.transformer
        labelbook_size = check_label_book(cfg)
        self.cfg = copy.deepcopy(cfg)
        self.num_classes = cfg.num_classes
        self.num_queries = t.num_queries
        self.num_feature_levels = t.num_feature_levels
        hidden = t.hidden_dim
        counts = {"hidden_dim": 1, "nheads": 1, "enc_layers": 0, "dec_layers": 1, "dim_feedforward": 1,
                  "num_queries": 1, "num_feature_levels": 1, "enc_n_points": 1, "dec_n_points": 1}
        for name, low in counts.items():  # a smaller count would fail deep inside the first forward (or divide by 0)
            if getattr(t, name) < low:
                raise UserError(f"model.transformer.{name} must be >= {low}, got {getattr(t, name)}")
        dn = cfg.denoising
        if dn.dn_number < 0 or not 0 <= dn.label_noise_ratio <= 1 or dn.box_noise_scale < 0:
            raise UserError(f"model.denoising: dn_number must be >= 0 (got {dn.dn_number}), label_noise_ratio in "
                            f"[0, 1] (got {dn.label_noise_ratio}), box_noise_scale >= 0 (got {dn.box_noise_scale})")
        if hidden % 32 != 0:
            raise UserError(f"model.transformer.hidden_dim must be a multiple of 32 (GroupNorm(32)), got {hidden}")
        if hidden % 2 != 0 or hidden % t.nheads != 0:
            raise UserError(f"model.transformer.hidden_dim {hidden} must be divisible by model.transformer.nheads "
                            f"{t.nheads}")

        self.backbone = Backbone(cfg.backbone)
        n_backbone = len(self.backbone.num_channels)
        if t.num_feature_levels < n_backbone:
            raise UserError(
                f"model.transformer.num_feature_levels ({t.num_feature_levels}) < backbone levels "
                f"({n_backbone}, backbone.return_levels={cfg.backbone.return_levels})"
            )
        self.position_encoding = PositionEmbeddingSine(hidden // 2, t.pe_temperature, normalize=True)
        proj = [nn.Sequential(nn.Conv2d(c, hidden, kernel_size=1), nn.GroupNorm(32, hidden))
                for c in self.backbone.num_channels]
        in_channels = self.backbone.num_channels[-1]
        for _ in range(t.num_feature_levels - n_backbone):
            proj.append(nn.Sequential(nn.Conv2d(in_channels, hidden, kernel_size=3, stride=2, padding=1),
                                      nn.GroupNorm(32, hidden)))
            in_channels = hidden
        self.input_proj = nn.ModuleList(proj)
        for p in self.input_proj:
            nn.init.xavier_uniform_(p[0].weight, gain=1)
            nn.init.zeros_(p[0].bias)

        self.transformer = DeformableTransformer(
            d_model=hidden, nhead=t.nheads, num_encoder_layers=t.enc_layers, num_decoder_layers=t.dec_layers,
            dim_feedforward=t.dim_feedforward, dropout=t.dropout, num_feature_levels=t.num_feature_levels,
            enc_n_points=t.enc_n_points, dec_n_points=t.dec_n_points, num_queries=t.num_queries,
            num_classes=cfg.num_classes, two_stage_bbox_size=t.two_stage_bbox_size,
        )
        self.label_enc = nn.Embedding(labelbook_size + 1, hidden)
        self.class_embed = nn.Linear(hidden, cfg.num_classes)
        self.bbox_embed = MLP(hidden, hidden, 4, 3)
        init_heads(self.class_embed, self.bbox_embed)
        self.dn = cfg.denoising

    def _features(self, images: torch.Tensor, mask: torch.Tensor):
        feats = self.backbone(images)
        srcs, masks, poss = [], [], []
        for lvl, f in enumerate(feats):
            m = _downsample_mask(mask, f.shape[-2:])
            srcs.append(self.input_proj[lvl](f))
            masks.append(m)
            poss.append(self.position_encoding(m).to(f.dtype))
        for lvl in range(len(feats), self.num_feature_levels):
            src = self.input_proj[lvl](feats[-1] if lvl == len(feats) else srcs[-1])
            m = _downsample_mask(mask, src.shape[-2:])
            srcs.append(src)
            masks.append(m)
            poss.append(self.position_encoding(m).to(src.dtype))
        return srcs, masks, poss

    def forward(self, images: torch.Tensor, mask: torch.Tensor, targets: list[dict] | None = None,
                query_indices: torch.Tensor | None = None) -> dict:
        """
        Args:
            images: (B, 3, H, W) ImageNet-normalised, zero-padded.
            mask: (B, H, W) bool, True on padding.
            targets: optional B dicts ``labels (N,) int64``, ``boxes (N, 4)`` cxcywh in [0, 1]; denoising queries
                are built only in training mode, with targets, when ``denoising.enabled``.
            query_indices: optional (B, Q) int64 encoder tokens to use as queries instead of the top-Q (export
                checks; see ``DeformableTransformer.forward``).
        Returns:
            ``pred_logits (B, Q, num_classes)``, ``pred_boxes (B, Q, 4)`` cxcywh in [0, 1], ``aux_outputs``
            (dec_layers - 1 dicts), ``interm_outputs``, ``query_indices (B, Q)`` int64 (the encoder tokens the
            queries were selected from, in query order); ``dn_meta`` when denoising ran.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"DINO: images must be (B, 3, H, W), got {tuple(images.shape)}")
        if mask.shape != (images.shape[0], *images.shape[-2:]) or mask.dtype != torch.bool:
            raise ValueError(f"DINO: mask must be bool (B, H, W) = {(images.shape[0], *images.shape[-2:])}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        srcs, masks, poss = self._features(images, mask)

        dn = None
        if self.training and targets is not None and self.dn.enabled and self.dn.dn_number > 0:
            dn = build_cdn_queries(targets, self.dn.dn_number, self.dn.label_noise_ratio, self.dn.box_noise_scale,
                                   self.num_classes, self.label_enc, self.num_queries)
        dn_label, dn_bbox, attn_mask, dn_meta = dn if dn is not None else (None, None, None, None)

        hs, references, interm_hidden, interm_boxes, selected = self.transformer(
            srcs, masks, poss, self.bbox_embed, dn_label, dn_bbox, attn_mask, query_indices)
        # Keeps label_enc in the graph when no denoising ran (unused parameters break DDP).
        hs[0] = hs[0] + self.label_enc.weight[0, 0] * 0.0

        logits = [self.class_embed(h) for h in hs]
        boxes = [(self.bbox_embed(h) + inverse_sigmoid(r)).sigmoid() for h, r in zip(hs, references[:-1])]

        pad = dn_meta["pad_size"] if dn_meta is not None else 0
        out = _layer_outputs([x[:, pad:] for x in logits], [x[:, pad:] for x in boxes])
        out["interm_outputs"] = {
            "pred_logits": self.transformer.enc_out_class_embed(interm_hidden),
            "pred_boxes": interm_boxes,
        }
        out["query_indices"] = selected
        if dn_meta is not None:
            dn_meta["output_known_lbs_bboxes"] = _layer_outputs([x[:, :pad] for x in logits],
                                                                [x[:, :pad] for x in boxes])
            out["dn_meta"] = dn_meta
        return out


def check_label_book(cfg: ModelConfig) -> int:
    """The label book size of ``cfg`` (``denoising.labelbook_size``, None: ``num_classes``), checked to cover every
    class: denoising draws replacement labels in ``[0, num_classes)`` and looks them up in ``label_enc``, so a smaller
    book would fail at random steps (IndexError on the CPU, a device-side assert on CUDA)."""
    if cfg.num_classes is None:
        raise UserError(
            "model.num_classes is not set (None means: from the dataset's annotations, which the training and "
            "evaluation setup fills in); set model.num_classes to build a model without a dataset"
        )
    if not isinstance(cfg.num_classes, int) or cfg.num_classes < 1:
        raise UserError(f"model.num_classes must be an int >= 1, got {cfg.num_classes!r}")
    size = cfg.denoising.labelbook_size
    if size is None:
        return cfg.num_classes
    if size < cfg.num_classes:
        raise UserError(
            f"model.denoising.labelbook_size={size} is smaller than model.num_classes={cfg.num_classes}: "
            f"the denoising label book must hold every class; set model.denoising.labelbook_size={cfg.num_classes} "
            "(or leave it unset to size it to num_classes)"
        )
    return size


def _layer_outputs(logits: list[torch.Tensor], boxes: list[torch.Tensor]) -> dict:
    return {
        "pred_logits": logits[-1],
        "pred_boxes": boxes[-1],
        "aux_outputs": [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])],
    }


def build_model(preset: str | ModelConfig) -> DINO:
    """Builds DINO with random weights (never downloads unless ``backbone.pretrained`` asks for it).

    Args:
        preset: a name from ``dino.presets.PRESETS`` or a :class:`~dino.config.ModelConfig`.
    """
    if isinstance(preset, str):
        from dino.presets import get_preset

        preset = get_preset(preset)
    if not isinstance(preset, ModelConfig):
        raise TypeError(f"build_model: expected a preset name or ModelConfig, got {type(preset).__name__}")
    return DINO(preset)
