"""Deformable transformer decoder with iterative box refinement (look forward twice)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from dino.models.anchors import inverse_sigmoid
from dino.models.deformable_attention import MSDeformAttn
from dino.models.mlp import MLP
from dino.models.position_encoding import sine_embed_boxes


class DeformableDecoderLayer(nn.Module):
    """Post-norm layer in the official order: self-attention -> deformable cross-attention -> FFN."""

    def __init__(self, d_model: int = 256, d_ffn: int = 2048, dropout: float = 0.0, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, memory_padding_mask, spatial_shapes,
                level_start_index, self_attn_mask=None):
        """
        Args:
            tgt, query_pos: (B, Q, C) content and positional queries.
            reference_points: (B, Q, L, 4) cxcywh boxes scaled per level by the valid ratios.
            memory: (B, S, C); memory_padding_mask: (B, S) bool.
            self_attn_mask: (Q, Q) bool, True where attention is blocked (denoising), or None.
        Returns:
            (B, Q, C).
        """
        q = k = tgt + query_pos
        tgt2 = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                               memory_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))


class DeformableDecoder(nn.Module):
    """Decoder layers, the shared output norm and the anchor-to-positional-query head.

    The box head used for refinement is owned by the detector (shared across layers, registered once) and is
    passed to :meth:`forward`.
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int, d_model: int = 256):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.d_model = d_model

    def forward(self, tgt, memory, memory_padding_mask, refpoints_unsigmoid, spatial_shapes, level_start_index,
                valid_ratios, bbox_embed: nn.Module, self_attn_mask=None):
        """
        Args:
            tgt: (B, Q, C) initial content queries.
            memory: (B, S, C); memory_padding_mask: (B, S) bool.
            refpoints_unsigmoid: (B, Q, 4) initial anchors, cxcywh in logit space.
            valid_ratios: (B, L, 2).
            bbox_embed: box-delta head, (..., C) -> (..., 4) logit-space deltas.
        Returns:
            hs: list of L_dec tensors (B, Q, C), normed outputs of each layer;
            references: list of L_dec + 1 tensors (B, Q, 4) cxcywh in [0, 1]: the input anchors of each layer
            and the last refinement. Entry i + 1 keeps its gradient through layer i's box delta (look forward
            twice); the next layer itself gets the detached copy.
        """
        output = tgt
        reference = refpoints_unsigmoid.sigmoid()
        references = [reference]
        hs = []
        ratios4 = torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        for layer in self.layers:
            ref_input = reference[:, :, None] * ratios4
            # The anchors stay float32 (box precision); their sine embedding enters the head in its parameters' dtype
            # (float16 in a model cast to float16; a no-op otherwise, autocast included).
            head_dtype = self.ref_point_head.layers[0].weight.dtype
            sine = sine_embed_boxes(ref_input[:, :, 0, :], self.d_model // 2).to(head_dtype)
            query_pos = self.ref_point_head(sine)
            output = layer(output, query_pos, ref_input, memory, memory_padding_mask, spatial_shapes,
                           level_start_index, self_attn_mask)
            new_reference = (bbox_embed(output) + inverse_sigmoid(reference)).sigmoid()
            reference = new_reference.detach()
            references.append(new_reference)
            hs.append(self.norm(output))
        return hs, references
