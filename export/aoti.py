"""AOTInductor packages (.pt2): the detector compiled ahead of time, loadable without this project's code.

The package is called as ``boxes, scores, labels, pred_logits, pred_boxes, query_indices = runner(images, mask)``:
the deploy-graph contract (:mod:`dino_export.deploy_model`) followed by the per-query outputs the detections were
selected from (``QUERY_OUTPUT_NAMES``), which the check compares query by query. On CUDA, when ``dino.ops`` has its
compiled kernel, deformable attention is traced as the ``dino::ms_deform_attn`` custom op and the package calls that
kernel (the loading process must then import ``dino.ops`` too). Everywhere else it traces to the PyTorch path
(GridSample), which Inductor compiles like any other op. Every package is compiled to a temporary file, checked against eager PyTorch query by query
(:func:`check_aoti`), and only then moved into place. The package metadata records the image size
(``IMAGE_SIZE_KEY``, "H,W") and the model's classes (:mod:`dino_export.artifact_labels`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from dino.errors import UserError
from dino.predict.artifacts import IMAGE_SIZE_KEY
from dino_export import files
from dino_export.check_reference import Referee
from dino_export.deploy_model import DeployModel, WithQueryOutputs
from dino_export.query_check import QueryCheck, Tolerance
from dino_export.tracing import check_inputs, example_inputs, export_program


def kernel_available(device: torch.device) -> bool:
    """Whether the compiled deformable-attention kernel can serve the custom op on ``device``."""
    if device.type != "cuda":
        return False
    try:
        from dino.ops import kernel_available as dino_kernel_available

        return bool(dino_kernel_available())
    except Exception:  # noqa: BLE001 - no kernel module or a failed build both mean "use the PyTorch path"
        return False


def check_aoti(model: DeployModel, runner, image_size: tuple[int, int], batches: list[int], device: torch.device,
               tolerance: Tolerance | None = None, seed: int = 100, reference: str = "auto") -> list[QueryCheck]:
    """Runs ``runner`` on letterboxed batches and compares its per-query outputs and detections with eager ``model``
    (on the package's query selection where near-tied proposals were ranked differently), judged as
    :class:`~dino_export.check_reference.Referee` says (``reference``: auto, float64 or float32).

    Raises ExportCheckError naming the largest difference beyond tolerance.
    """
    referee = Referee(model, image_size, reference, tolerance)
    checks = []
    for batch in batches:
        images, mask = (t.to(device) for t in check_inputs(batch, image_size, seed + batch))
        with torch.no_grad():
            got = runner(images, mask)
        checks.append(referee.check(images, mask, got, f"AOTInductor ({device.type})"))
        checks[-1].raise_on_failure(f"eager {referee.reference_name}")
    return checks


def export_aoti(
    model: DeployModel,
    output: str | os.PathLike,
    image_size: tuple[int, int],
    device: str | torch.device = "cpu",
    dynamic_batch: bool = False,
    max_batch: int = 16,
    custom_op: bool | None = None,
    verify: bool = True,
    labels: dict[str, str] | None = None,
    reference: str = "auto",
) -> tuple[Path, list[QueryCheck]]:
    """Compiles ``model`` for ``(H, W)`` canvases on ``device`` into an AOTInductor package at ``output``.

    ``custom_op=None`` picks the custom op when the kernel is available on ``device``; ``labels`` go in the package
    metadata with the image size; ``reference``: what the check judges it against (:func:`check_aoti`).
    Returns (path, checks);
    raises ExportCheckError (nothing written) when the package disagrees with eager PyTorch.
    """
    device = torch.device(device)
    if custom_op is None:
        custom_op = kernel_available(device)
    path = Path(output)
    if path.suffix != ".pt2":
        raise UserError(f"an AOTInductor package must end in .pt2, got {path}")
    model = model.to(device).eval()
    # Always traced with a symbolic batch: Inductor fails on the static batch-1 program (a data-dependent guard on
    # the level shapes read with tolist); without --dynamic-batch the package is still only promised for batch 1.
    example = example_inputs(2, image_size, device=device)
    program = export_program(WithQueryOutputs(model), example, True, max(max_batch, 2), custom_op)
    checks: list[QueryCheck] = []
    with files.staged(path) as tmp:
        metadata = {IMAGE_SIZE_KEY: f"{image_size[0]},{image_size[1]}", **(labels or {})}
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp),
                                                 inductor_configs={"aot_inductor.metadata": metadata})
        if verify:
            runner = torch._inductor.aoti_load_package(str(tmp))
            checks = check_aoti(model, runner, image_size, [1, 3] if dynamic_batch else [1], device,
                                reference=reference)
        files.commit(tmp, path)
    return path, checks


def load_aoti(path: str | os.PathLike):
    """Loads a package; the result is called as ``boxes, scores, labels, *per_query = runner(images, mask)``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"AOTInductor package {path} does not exist")
    return torch._inductor.aoti_load_package(str(path))
