"""``torch.export`` of a deploy model, shared by the ONNX and AOTInductor exporters."""
from __future__ import annotations

import torch
from torch import nn

from dino.ops import use_custom_op, use_pytorch_path


def example_inputs(batch: int, image_size: tuple[int, int], device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A letterboxed example batch: ``images (B, 3, H, W)`` and ``mask (B, H, W)`` bool, the first image filling
    the canvas and the others padded (right/bottom) to about 3/4 of it, so no input is constant."""
    height, width = image_size
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=gen, dtype=torch.float32)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    for i in range(1, batch):
        h = max(1, height * 3 // 4 - 8 * (i - 1))
        w = max(1, width * 3 // 4 + 8 * (i - 1))
        mask[i, h:, :] = True
        mask[i, :, min(w, width):] = True
    images = images.masked_fill(mask[:, None], 0.0)
    return images.to(device=device, dtype=dtype), mask.to(device)


def check_inputs(batch: int, image_size: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Letterboxed inputs for export checks; batch 1 is padded too, so every check runs the mask."""
    images, mask = example_inputs(batch + 1, image_size, seed=seed)
    if batch == 1:
        return images[1:], mask[1:]
    return images[:batch], mask[:batch]


def export_program(model: nn.Module, example: tuple[torch.Tensor, torch.Tensor], dynamic_batch: bool,
                   max_batch: int, custom_op: bool) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model(images, mask)``; the batch axis of both inputs symbolic (1..max_batch) when
    ``dynamic_batch``. With ``custom_op`` deformable attention is traced as one ``dino::ms_deform_attn`` op per call
    (inside :func:`dino.ops.use_custom_op`), otherwise as the PyTorch (GridSample) path, also on CUDA with the
    kernel built (inside :func:`dino.ops.use_pytorch_path`).

    The PyTorch seam reads the level shapes as Python ints (``tolist``), which only strict (Dynamo) tracing keeps
    static, so that route starts with strict mode; the custom-op route (a fake kernel, no ``tolist``) starts with
    non-strict. The other mode is the fallback.
    """
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        dynamic_shapes = {"images": {0: batch}, "mask": {0: batch}}
    route = use_custom_op() if custom_op else use_pytorch_path()
    errors = []
    with route, torch.no_grad():
        for strict in ((False, True) if custom_op else (True, False)):
            try:
                return torch.export.export(model, example, dynamic_shapes=dynamic_shapes, strict=strict)
            except Exception as err:  # noqa: BLE001 - retried in the other mode, reported if both fail
                errors.append(f"strict={strict}: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
    raise RuntimeError("torch.export failed: " + " | ".join(errors))
