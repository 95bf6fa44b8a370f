"""AOTInductor packages (.pt2): the detector compiled ahead of time, loadable without this project's code.

On CUDA, when ``dino.ops`` has its compiled kernel, the seam is traced as the ``dino::ms_deform_attn`` custom op and
the package calls that kernel (the loading process must then load the kernel library too). Everywhere else the
seam traces to the PyTorch path (GridSample), which Inductor compiles like any other op.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from dino.errors import UserError
from export.deploy_model import DeployModel
from export.tracing import export_program


def kernel_available(device: torch.device) -> bool:
    """Whether the compiled deformable-attention kernel can serve the custom op on ``device``."""
    if device.type != "cuda":
        return False
    try:
        from dino.ops import kernel_available as dino_kernel_available

        return bool(dino_kernel_available())
    except Exception:  # noqa: BLE001 - no kernel module or a failed build both mean "use the PyTorch path"
        return False


def export_aoti(
    model: DeployModel,
    output: str | os.PathLike,
    image_size: tuple[int, int],
    device: str | torch.device = "cpu",
    dynamic_batch: bool = False,
    max_batch: int = 16,
    use_custom_op: bool | None = None,
) -> Path:
    """Compiles ``model`` for ``(H, W)`` images on ``device`` into an AOTInductor package at ``output`` (atomic).

    ``use_custom_op=None`` picks the custom op when the kernel is available on ``device``.
    """
    device = torch.device(device)
    if use_custom_op is None:
        use_custom_op = kernel_available(device)
    path = Path(output)
    if path.suffix != ".pt2":
        raise UserError(f"an AOTInductor package must end in .pt2, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.to(device).eval()
    height, width = image_size
    # Always traced with a symbolic batch: Inductor fails on the static batch-1 program (a data-dependent guard on
    # the level shapes read with tolist); without --dynamic-batch the package is still only promised for batch 1.
    example = torch.randn(2, 3, height, width, device=device)
    program = export_program(model, example, True, max(max_batch, 2), use_custom_op)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".pt2", dir=path.parent)
    os.close(fd)
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_aoti(path: str | os.PathLike):
    """Loads a package; the result is called as ``boxes, scores, labels = runner(images)``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"AOTInductor package {path} does not exist")
    return torch._inductor.aoti_load_package(str(path))
