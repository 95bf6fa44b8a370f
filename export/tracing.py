"""``torch.export`` of a deploy model, shared by the ONNX and AOTInductor exporters."""
from __future__ import annotations

import contextlib

import torch

from export.deform_route import custom_op_seam
from export.deploy_model import DeployModel


def export_program(model: DeployModel, example: torch.Tensor, dynamic_batch: bool, max_batch: int,
                   use_custom_op: bool) -> torch.export.ExportedProgram:
    """``torch.export`` of the deploy model; batch axis symbolic (1..max_batch) when ``dynamic_batch``.

    The PyTorch seam reads the level shapes as Python ints (``tolist``), which only strict (Dynamo) tracing keeps
    static, so that route starts with strict mode; the custom-op route (a fake kernel, no ``tolist``) starts with
    non-strict. The other mode is the fallback.
    """
    dynamic_shapes = ({"images": {0: torch.export.Dim("batch", min=1, max=max_batch)}} if dynamic_batch else None)
    route = custom_op_seam() if use_custom_op else contextlib.nullcontext()
    errors = []
    with route, torch.no_grad():
        for strict in ((False, True) if use_custom_op else (True, False)):
            try:
                return torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes, strict=strict)
            except Exception as err:  # noqa: BLE001 - retried in the other mode, reported if both fail
                errors.append(f"strict={strict}: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
    raise RuntimeError("torch.export failed: " + " | ".join(errors))
