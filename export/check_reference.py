"""What an exported backend is judged against, and how closely.

A float32 backend and PyTorch float32 both round; on trained weights at a canvas larger than the training images
their roundings grow apart (docs/deployment.md "Export checks": the trained quickstart model at 800x1333), so a fixed
tolerance between two float32 runs fails correct graphs there, or must be so loose that it passes wrong ones. The
check therefore takes PyTorch **float64** as the truth and asks that the backend be no further from it than PyTorch
float32 is, times :data:`FACTOR`, plus the floor :data:`FLOOR`:

    |backend - float64| <= FACTOR * |PyTorch float32 - float64| + FLOOR      (per query: probability, box in px)

measured on the same input, each on its own query selection (the float64 model is rerun on a selection that
differs). Where float64 costs too much (:func:`float64_affordable`: R50 at 800x1333 on a CPU), the check is
today's: the backend against PyTorch float32 at :data:`~dino_export.query_check.FP32_TOLERANCE`. A float16 graph is
judged against the same weights computing in float32 at :data:`~dino_export.query_check.FP16_TOLERANCE`. Every
check line says which of these ran.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from dino_export.deploy_model import DeployModel
from dino_export.query_check import (
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    QueryCheck,
    Tolerance,
    check_outputs,
    compare_queries,
    compare_selection,
    reference_model,
)

# Measured (docs/deployment.md "Judged against float64"): ONNX Runtime CPU's distance from float64 was at most 2.5x
# PyTorch float32's over the random R50 at 320x480 and the trained quickstart model at 64x64 to 800x1333 (per-query
# probability and box), so 8 leaves 3.2x; the floor (about 18x the smallest distance measured, 1.1e-7) covers a
# run where PyTorch float32 happens to land on the float64 value; a wrong graph is off by 1e-3 and more.
FACTOR = 8.0
FLOOR = Tolerance(score=2e-6, box_px=2e-4)
# float64 costs about 3x float32 on a CPU, and the check runs it once per checked batch: affordable up to about the
# random R50 at 320x480 (4.7e7 parameters x 1.5e5 pixels); the quickstart model at 800x1333 is 2.1e12, R50 at 800x1333
# 5.0e13.
FLOAT64_BUDGET = 1.0e13
REFERENCES = ("auto", "float64", "float32")


@dataclasses.dataclass(frozen=True)
class Judge:
    """The reference model one input's backend outputs are compared with, the tolerance, and a line saying so."""

    reference: DeployModel
    tolerance: Tolerance
    basis: str


def float64_affordable(model: DeployModel, image_size: tuple[int, int]) -> bool:
    """Whether a float64 run of ``model`` on an ``(H, W)`` canvas fits :data:`FLOAT64_BUDGET` (parameters x pixels,
    a proxy of the forward's cost that does not depend on the machine, so a command always runs the same check)."""
    params = sum(p.numel() for p in model.parameters())
    return params * image_size[0] * image_size[1] <= FLOAT64_BUDGET


class Referee:
    """Makes the :class:`Judge` of each checked input for one exported ``model``.

    ``reference``: ``"float64"`` (the truth, scaled tolerance), ``"float32"`` (PyTorch float32 at the fixed float32
    tolerance) or ``"auto"`` (float64 where :func:`float64_affordable`). Float16 models are always judged against
    their float32 twin at the float16 tolerance. ``tolerance`` overrides the fixed tolerance of the float32 and
    float16 checks (tests).
    """

    def __init__(self, model: DeployModel, image_size: tuple[int, int], reference: str = "auto",
                 tolerance: Tolerance | None = None):
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
        self.model = model
        self.fixed = tolerance
        self.use_float64 = not model.half and (
            reference == "float64" or (reference == "auto" and tolerance is None
                                       and float64_affordable(model, image_size)))
        self.skipped = "" if self.use_float64 or model.half or reference == "float32" else \
            f"float64 reference skipped: {_cost(model, image_size)} is over the float64 budget"
        self._truth = model.float64_twin() if self.use_float64 else None
        self._float32_twin = reference_model(model) if model.half else None

    def judge(self, images: Tensor, mask: Tensor) -> Judge:
        """The judge of one input ``images (B, 3, H, W)``, ``mask (B, H, W)``."""
        if self.model.half:
            return Judge(self._float32_twin, self.fixed or FP16_TOLERANCE,
                         "judged against the same weights in PyTorch float32 at the fixed float16 tolerance")
        if not self.use_float64:
            why = f" ({self.skipped})" if self.skipped else ""
            return Judge(self.model, self.fixed or FP32_TOLERANCE,
                         f"judged against PyTorch float32 at the fixed float32 tolerance{why}")
        truth = self._truth
        with torch.no_grad():
            eager = self.model.run(images, mask)
            truth_own = truth.run(images, mask)
            truth_on_eager = truth_own if torch.equal(truth_own.query_indices, eager.query_indices) else \
                truth.run(images, mask, query_indices=eager.query_indices)
        score, box = compare_queries(truth_on_eager, eager.pred_logits, eager.pred_boxes)
        selection, _ = compare_selection(truth_own, truth_on_eager)
        eager_score = max(score.value, selection.value)
        tolerance = Tolerance(score=FACTOR * eager_score + FLOOR.score, box_px=FACTOR * box.value + FLOOR.box_px)
        return Judge(truth, tolerance,
                     f"judged against PyTorch float64, from which PyTorch float32 is {eager_score:.2g} in score and "
                     f"{box.value:.2g} px (tolerance {FACTOR:g}x that + {FLOOR.score:g}, {FLOOR.box_px:g} px)")

    def check(self, images: Tensor, mask: Tensor, outputs: list | tuple, backend: str) -> QueryCheck:
        """:func:`~dino_export.query_check.check_outputs` of a graph's six outputs on ``(images, mask)`` against
        this input's judge; the check (not raised) says which reference it was judged against."""
        judge = self.judge(images, mask)
        check = check_outputs(judge.reference, images, mask, outputs, backend, judge.tolerance)
        check.basis = judge.basis
        return check

    @property
    def reference_name(self) -> str:
        return "PyTorch float64" if self.use_float64 else "PyTorch"


def _cost(model: DeployModel, image_size: tuple[int, int]) -> str:
    params = sum(p.numel() for p in model.parameters())
    return f"{params / 1e6:.1f}M parameters x {image_size[0]}x{image_size[1]} px"
