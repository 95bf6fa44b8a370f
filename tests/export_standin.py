"""A tiny detector with the DINO I/O contract and real MSDeformAttn layers, for testing export/ machinery fast."""
from __future__ import annotations

import torch
from torch import nn

from dino.models.deformable_attention import MSDeformAttn


class StandInDetector(nn.Module):
    """``model(images, mask, query_indices=None) -> {pred_logits (B,Q,C), pred_boxes (B,Q,4), interm_outputs,
    query_indices (B,Q)}`` with ``num_layers`` deformable attentions. Like DINO, its queries are selected by top-k
    over image-dependent scores (here: all Q candidates, ranked), or taken from ``query_indices``."""

    def __init__(self, dim: int = 32, num_queries: int = 10, num_classes: int = 5, num_layers: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 8, stride=8)
        self.down = nn.Conv2d(dim, dim, 3, stride=2, padding=1)
        self.layers = nn.ModuleList(MSDeformAttn(dim, n_levels=2, n_heads=4, n_points=2) for _ in range(num_layers))
        self.queries = nn.Parameter(torch.randn(num_queries, dim))
        self.refs = nn.Parameter(torch.rand(num_queries, 2))
        self.cls = nn.Linear(dim, num_classes)
        self.box = nn.Linear(dim, 4)

    def forward(self, images, mask, query_indices=None):
        f1 = self.stem(images)
        f2 = self.down(f1)
        shapes = torch.as_tensor([f.shape[-2:] for f in (f1, f2)], dtype=torch.long, device=images.device)
        starts = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
        value = torch.cat([f.flatten(2).transpose(1, 2) for f in (f1, f2)], 1)
        candidates = self.queries.unsqueeze(0) + f2.mean((2, 3)).unsqueeze(1)  # (B, Q, dim)
        scores = self.cls(candidates)
        if query_indices is None:
            query_indices = torch.topk(scores.max(-1)[0], self.queries.shape[0], dim=1)[1]
        q = torch.gather(candidates, 1, query_indices.unsqueeze(-1).expand(-1, -1, candidates.shape[-1]))
        ref = self.refs.sigmoid()[query_indices][:, :, None, :].expand(-1, -1, 2, -1)
        for layer in self.layers:
            q = q + layer(q, ref, value, shapes, starts)
        interm = {"pred_logits": torch.gather(scores, 1, query_indices.unsqueeze(-1).expand(-1, -1, scores.shape[-1]))}
        return {"pred_logits": self.cls(q), "pred_boxes": self.box(q).sigmoid(), "interm_outputs": interm,
                "query_indices": query_indices}
