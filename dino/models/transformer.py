"""DINO's deformable transformer: encoder, two-stage query selection, decoder."""
from __future__ import annotations

import math

import torch
from torch import nn

from dino.errors import UserError
from dino.models.anchors import encoder_proposals
from dino.models.decoder import DeformableDecoder, DeformableDecoderLayer
from dino.models.deformable_attention import MSDeformAttn
from dino.models.encoder import DeformableEncoder, DeformableEncoderLayer
from dino.models.mlp import MLP


def valid_ratios(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool padding mask -> (B, 2) float32 (w, h) fraction of the map that holds image."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1)
    valid_w = (~mask[:, 0, :]).sum(1)
    # float32 like the official code, whatever the model dtype (parity depends on it).
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


class DeformableTransformer(nn.Module):
    """Encoder over all levels, top-``num_queries`` encoder proposals as decoder anchors (mixed query selection:
    learnable content queries ``tgt_embed``, positions from the selected boxes), decoder.
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.0, num_feature_levels: int = 4,
                 enc_n_points: int = 4, dec_n_points: int = 4, num_queries: int = 900, num_classes: int = 91,
                 two_stage_bbox_size: float = 0.05):
        super().__init__()
        self.d_model = d_model
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.two_stage_bbox_size = two_stage_bbox_size
        self.encoder = DeformableEncoder(
            DeformableEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points),
            num_encoder_layers,
        )
        self.decoder = DeformableDecoder(
            DeformableDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points),
            num_decoder_layers,
            d_model,
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.tgt_embed = nn.Embedding(num_queries, d_model)
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self._reset_parameters()
        # Encoder-proposal heads are not shared with the decoder heads (official two_stage_*_embed_share=False).
        self.enc_out_class_embed = nn.Linear(d_model, num_classes)
        self.enc_out_bbox_embed = MLP(d_model, d_model, 4, 3)
        init_heads(self.enc_out_class_embed, self.enc_out_bbox_embed)

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs, masks, pos_embeds, bbox_embed: nn.Module, dn_query_label=None, dn_query_bbox=None,
                self_attn_mask=None, query_indices=None):
        """
        Args:
            srcs: L tensors (B, C, H_l, W_l) projected features; masks: L (B, H_l, W_l) bool (True on padding);
                pos_embeds: L (B, C, H_l, W_l).
            bbox_embed: the decoder's shared box head.
            dn_query_label: (B, pad, C) denoising content queries or None; dn_query_bbox: (B, pad, 4) logit-space
                boxes or None; self_attn_mask: (pad + Q, pad + Q) bool or None.
        Returns:
            hs: list of L_dec (B, pad + Q, C); references: list of L_dec + 1 (B, pad + Q, 4) cxcywh in [0, 1];
            interm_hidden: (B, Q, C) selected encoder tokens; interm_boxes: (B, Q, 4) their boxes in [0, 1];
            query_indices: (B, Q) int64 the selected tokens' indices into the flattened levels, in query order.
        """
        spatial_shapes = [(int(s.shape[-2]), int(s.shape[-1])) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
        pos_flat = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1) for lvl, p in enumerate(pos_embeds)],
            1,
        )
        shapes_tensor = torch.as_tensor(spatial_shapes, dtype=torch.long, device=src_flat.device)
        level_start_index = torch.cat((shapes_tensor.new_zeros((1,)), shapes_tensor.prod(1).cumsum(0)[:-1]))
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)

        memory = self.encoder(src_flat, pos_flat, spatial_shapes, shapes_tensor, level_start_index, ratios, mask_flat)

        # Two-stage: score every encoder token as a proposal, keep the top num_queries as decoder anchors.
        out_memory, proposals = encoder_proposals(memory, mask_flat, spatial_shapes, self.two_stage_bbox_size)
        out_memory = self.enc_output_norm(self.enc_output(out_memory))
        enc_logits = self.enc_out_class_embed(out_memory)
        enc_coords = self.enc_out_bbox_embed(out_memory) + proposals
        if enc_logits.shape[1] < self.num_queries:
            raise UserError(
                f"DINO: the image gives {enc_logits.shape[1]} encoder tokens {spatial_shapes}, fewer than "
                f"transformer.num_queries={self.num_queries}; use larger images or fewer queries"
            )
        if query_indices is None:
            topk = torch.topk(enc_logits.max(-1)[0], self.num_queries, dim=1)[1]
        elif query_indices.shape != (enc_logits.shape[0], self.num_queries):
            raise ValueError(f"DINO: query_indices must be (B, Q) = {(enc_logits.shape[0], self.num_queries)}, "
                             f"got {tuple(query_indices.shape)}")
        else:
            topk = query_indices.to(device=enc_logits.device, dtype=torch.long)
        refpoints_undetached = torch.gather(enc_coords, 1, topk.unsqueeze(-1).expand(-1, -1, 4))
        interm_hidden = torch.gather(out_memory, 1, topk.unsqueeze(-1).expand(-1, -1, self.d_model))
        refpoints = refpoints_undetached.detach()
        batch = src_flat.shape[0]
        tgt = self.tgt_embed.weight[None].expand(batch, -1, -1)
        if dn_query_bbox is not None:
            refpoints = torch.cat([dn_query_bbox, refpoints], 1)
            tgt = torch.cat([dn_query_label, tgt], 1)

        hs, references = self.decoder(tgt, memory, mask_flat, refpoints, shapes_tensor, level_start_index, ratios,
                                      bbox_embed, self_attn_mask)
        return hs, references, interm_hidden, refpoints_undetached.sigmoid(), topk


def init_heads(class_embed: nn.Linear, bbox_embed: MLP, prior_prob: float = 0.01) -> None:
    """Official head init: class bias at the focal-loss prior, box head's last layer zero (start at the anchor)."""
    nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
    nn.init.zeros_(bbox_embed.layers[-1].weight)
    nn.init.zeros_(bbox_embed.layers[-1].bias)
