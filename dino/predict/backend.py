"""The backend interface of :mod:`dino.predict`, and :class:`ModelBackend`, a PyTorch model behind it.

A backend is anything with the deploy-graph contract (docs/ARCHITECTURE.md, CONTRACTS item 4)::

    boxes, scores, labels = backend.run(images, mask)
    # images (B, 3, H, W) float32 normalised, mask (B, H, W) bool True on padding ->
    # boxes (B, K, 4) xyxy pixels of each image's valid (resized) region, scores (B, K) descending, labels (B, K) int64

plus ``device``, ``input_size`` ((H, W) of a fixed-size graph, or None) and ``max_batch`` (None: any batch).
:class:`ModelBackend` runs a PyTorch model here; :mod:`dino.predict.artifacts` runs exported artifacts (ONNX Runtime,
OpenVINO, AOTInductor, TensorRT). :data:`INPUT_NAMES` and :data:`OUTPUT_NAMES` are the contract's tensor names, as every
exported graph declares them.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from dino.postprocess import postprocess

INPUT_NAMES = ("images", "mask")
OUTPUT_NAMES = ("boxes", "scores", "labels")


class Backend(Protocol):
    """What :mod:`dino.predict` runs: the deploy-graph contract of the module docstring."""

    device: torch.device
    input_size: tuple[int, int] | None
    max_batch: int | None

    def run(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def valid_sizes(mask: torch.Tensor) -> torch.Tensor:
    """(B, 2) float (height, width) of each image's unpadded region, from ``mask (B, H, W)`` True on padding."""
    valid = ~mask
    return torch.stack([valid.any(2).sum(1), valid.any(1).sum(1)], 1).float()


class ModelBackend:
    """A DINO model (``model(images, mask) -> {pred_logits, pred_boxes}``) in PyTorch, with top-k post-processing."""

    input_size = None
    max_batch = None
    name = "pytorch"

    def __init__(self, model: nn.Module, num_select: int, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.num_select = num_select

    @torch.no_grad()
    def run(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(images, mask)
        # pred_boxes are normalised by each image's valid region, so scaling by it gives that region's pixels.
        scores, labels, boxes = postprocess(out["pred_logits"].float(), out["pred_boxes"].float(), valid_sizes(mask),
                                            self.num_select)
        return boxes, scores, labels
