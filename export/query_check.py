"""Comparing a deployed detector with its reference query by query, so rank swaps of near-tied scores cannot
break the comparison.

Three comparisons, each reporting the largest difference and where it is:

- :func:`compare_selection`: DINO picks its decoder queries as the top-Q encoder tokens by score (two-stage), and
  each query slot has its own learned content embedding, so two near-tied tokens ranked the other way change those
  queries' outputs entirely. Where the graph exposes ``query_indices`` (ONNX) and they differ from PyTorch's, the
  reference is run again on the graph's selection, and the selection itself is checked: the PyTorch scores of the
  tokens the graph picked, in the graph's order, must equal PyTorch's own top-Q scores rank by rank.
- :func:`compare_queries`: the raw per-query outputs (every query's class probabilities ``sigmoid(pred_logits)``
  and its box in pixels) against the reference run on the same selection, available wherever the graph exposes
  ``pred_logits``/``pred_boxes`` (ONNX). The final top-k plays no part, so this is the sharp test of the detector.
- :func:`compare_detections`: the final ``(boxes, scores, labels)`` of a backend against the reference's per-query
  outputs. Each detection is matched to the reference query of its label that agrees best with it (score and box),
  and the sorted score lists are compared. Used where only final outputs exist (AOTInductor, TensorRT) and, for
  ONNX, to check the in-graph top-k too.

Tolerances (:class:`Tolerance`) are in probability units and pixels of the network input.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor

from dino.box_ops import box_cxcywh_to_xyxy
from dino_export.deploy_model import DeployModel, DeployOutputs, valid_sizes


class ExportCheckError(RuntimeError):
    """An exported graph disagrees with its reference beyond tolerance, or could not be run to find out."""


class GraphDisagrees(ExportCheckError):
    """The graph ran and its outputs are beyond tolerance of the reference's; the message says by how much, where.
    ``detail``: the same without the leading "<backend> disagrees with <reference>" (for the CLI's one line)."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Tolerance:
    score: float  # |delta probability|
    box_px: float  # |delta box coordinate| in pixels of the network input


# Measured (docs/deployment.md "Export checks"). float32: random-weight dino_r50_4scale at 320x480, ONNX Runtime CPU
# vs PyTorch CPU, per query: 1.4e-7 and 3.4e-5 px, so these leave more than 1000x. float16 graphs are checked against
# float32 PyTorch (reference_model): the largest float16 error of dino_r50_4scale measured is 4.2e-4 in probability
# and 0.44 px at 800x1333 (PyTorch float16 on an H200, docs/benchmarks.md; ONNX Runtime's float16 graph: 2.1e-4 and
# 0.13 px at 800x1333, 1.0e-4 and 0.03 px at 320x480); these leave about 12x and 4.5x.
FP32_TOLERANCE = Tolerance(score=1e-4, box_px=0.05)
FP16_TOLERANCE = Tolerance(score=5e-3, box_px=2.0)


def tolerance_for(half: bool) -> Tolerance:
    """The check tolerance of a float32 or float16 graph."""
    return FP16_TOLERANCE if half else FP32_TOLERANCE


@dataclasses.dataclass
class Difference:
    """The largest difference of one kind and where it occurred."""

    value: float = 0.0
    where: str = ""

    def update(self, value: float, where: str) -> None:
        if value > self.value or not self.where:
            self.value, self.where = value, where


@dataclasses.dataclass
class QueryCheck:
    """One backend on one batch: largest differences per query (when available) and over matched detections."""

    backend: str
    batch: int
    tolerance: Tolerance
    query_score: Difference | None = None
    query_box: Difference | None = None
    selection_score: Difference | None = None  # rank-wise proposal-score difference of the graph's query selection
    reselected: int = 0  # queries whose encoder token differs from PyTorch's selection (near-tied ranks)
    detection_score: Difference = dataclasses.field(default_factory=Difference)
    detection_box: Difference = dataclasses.field(default_factory=Difference)
    basis: str = ""  # which reference and tolerance it was judged by (dino_export.check_reference)

    def failures(self) -> list[tuple[str, Difference, float, str]]:
        """(kind, difference, tolerance, unit) of every comparison beyond tolerance, largest relative first."""
        items = [("query selection score", self.selection_score, self.tolerance.score, ""),
                 ("per-query score", self.query_score, self.tolerance.score, ""),
                 ("per-query box", self.query_box, self.tolerance.box_px, " px"),
                 ("detection score", self.detection_score, self.tolerance.score, ""),
                 ("detection box", self.detection_box, self.tolerance.box_px, " px")]
        bad = [(k, d, t, u) for k, d, t, u in items if d is not None and not d.value <= t]
        return sorted(bad, key=lambda x: -(x[1].value / x[2]) if np.isfinite(x[1].value) else -np.inf)

    def line(self) -> str:
        parts = []
        if self.selection_score is not None:
            parts.append(f"{self.reselected} queries selected differently (near-tied proposals; max rank-wise score "
                         f"diff {self.selection_score.value:.3g}, PyTorch rerun on the graph's selection)"
                         if self.reselected else "same query selection")
        if self.query_score is not None:
            parts.append(f"per query: max |score| diff {self.query_score.value:.3g}, "
                         f"max |box| diff {self.query_box.value:.3g} px")
        parts.append(f"detections matched by query: max |score| diff {self.detection_score.value:.3g}, "
                     f"max |box| diff {self.detection_box.value:.3g} px")
        return (f"{self.backend} batch {self.batch}: " + "; ".join(parts) +
                f" (tolerance {self.tolerance.score:.3g}, {self.tolerance.box_px:.3g} px" +
                (f"; {self.basis})" if self.basis else ")"))

    def raise_on_failure(self, reference: str) -> None:
        bad = self.failures()
        if bad:
            kind, diff, tol, unit = bad[0]
            others = "; ".join(f"{k} {d.value:.3g}{u} (tolerance {t:.3g}{u})" for k, d, t, u in bad[1:])
            detail = (f"largest difference: {kind} {diff.value:.3g}{unit} at {diff.where} (tolerance {tol:.3g}{unit})"
                      + (f"; also {others}" if others else ""))
            raise GraphDisagrees(f"{self.backend} disagrees with {reference} (batch {self.batch}): {detail}",
                                 f"{detail} ({self.backend}, batch {self.batch}, against {reference})")


def _np(t) -> np.ndarray:
    # float64 throughout: a float64 reference must not be rounded to float32 before it is compared.
    return t.detach().cpu().double().numpy() if torch.is_tensor(t) else np.asarray(t, dtype=np.float64)


def query_boxes_px(pred_boxes: Tensor | np.ndarray, sizes: Tensor | np.ndarray) -> np.ndarray:
    """``pred_boxes (B, Q, 4)`` cxcywh in [0, 1] of the valid region, ``sizes (B, 2)`` (h, w) -> xyxy pixels."""
    boxes = box_cxcywh_to_xyxy(torch.as_tensor(_np(pred_boxes)))
    sizes = torch.as_tensor(_np(sizes))
    scale = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], 1)
    return (boxes * scale[:, None, :]).numpy()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _max_at(diff: np.ndarray, describe) -> Difference:
    """Largest entry of ``diff`` (NaN counts as infinitely large) and its described index."""
    flat = np.where(np.isnan(diff), np.inf, diff)
    idx = np.unravel_index(int(np.argmax(flat)), diff.shape)
    return Difference(float(flat[idx]), describe(idx))


def compare_queries(reference: DeployOutputs, pred_logits, pred_boxes) -> tuple[Difference, Difference]:
    """Largest per-query probability and box (px) differences of a candidate's raw outputs from ``reference``."""
    ref_prob = _sigmoid(_np(reference.pred_logits))
    prob = _sigmoid(_np(pred_logits))
    if prob.shape != ref_prob.shape:
        raise ExportCheckError(f"pred_logits has shape {prob.shape}, expected {ref_prob.shape}")
    sizes = _np(reference.valid_sizes)
    score = _max_at(np.abs(prob - ref_prob), lambda i: f"image {i[0]}, query {i[1]}, class {i[2]}")
    box = _max_at(np.abs(query_boxes_px(pred_boxes, sizes) - query_boxes_px(reference.pred_boxes, sizes)),
                  lambda i: f"image {i[0]}, query {i[1]}, coordinate {'x0 y0 x1 y1'.split()[i[2]]}")
    return score, box


def compare_selection(reference: DeployOutputs, on_selection: DeployOutputs) -> tuple[Difference, int]:
    """Whether a graph's query selection is a valid top-Q of the reference's proposal scores.

    ``reference``: PyTorch's own run; ``on_selection``: PyTorch run on the graph's ``query_indices``. Returns the
    largest rank-wise difference of the selected proposals' probabilities (the graph's order against PyTorch's
    descending top-Q) and the number of queries whose token differs.
    """
    ref = _sigmoid(_np(reference.proposal_scores))  # (B, Q), descending: the top-Q scores
    got = _sigmoid(_np(on_selection.proposal_scores))  # (B, Q): the same model's scores of the graph's picks
    diff = _max_at(np.abs(got - ref), lambda i: f"image {i[0]}, query {i[1]} (selection rank)")
    differ = int((_np(reference.query_indices) != _np(on_selection.query_indices)).sum())
    return diff, differ


def compare_detections(reference: DeployOutputs, boxes, scores, labels, tolerance: Tolerance
                       ) -> tuple[Difference, Difference]:
    """Largest score and box (px) differences of a candidate's detections from ``reference``, matched by query.

    Each candidate detection ``(box, score, label)`` is matched to the reference query ``q`` minimising
    ``max(|p_ref[q, label] - score| / tol.score, max|box_ref[q] - box| / tol.box_px)``; a detection whose best
    match is beyond tolerance is wrong whatever its rank. The sorted candidate scores are also compared with the
    reference's top-K scores (rank by rank, which near-ties cannot break), so a dropped or invented detection shows.
    """
    ref_prob = _sigmoid(_np(reference.pred_logits))  # (B, Q, C)
    ref_boxes = query_boxes_px(reference.pred_boxes, reference.valid_sizes)  # (B, Q, 4)
    boxes, scores, labels = _np(boxes), _np(scores), np.asarray(
        labels.detach().cpu() if torch.is_tensor(labels) else labels).astype(np.int64)
    ref_scores = _np(reference.scores)
    if scores.shape != ref_scores.shape or boxes.shape != (*ref_scores.shape, 4) or labels.shape != scores.shape:
        raise ExportCheckError(f"detections have shapes boxes {boxes.shape}, scores {scores.shape}, labels "
                               f"{labels.shape}; expected {(*ref_scores.shape, 4)}, {ref_scores.shape}")
    num_classes = ref_prob.shape[2]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ExportCheckError(f"labels outside 0..{num_classes - 1}: {labels.min()}..{labels.max()}")
    score_diff, box_diff = Difference(), Difference()
    for b in range(scores.shape[0]):
        cand_prob = np.take_along_axis(ref_prob[b], labels[b][None, :], axis=1)  # (Q, K): p_ref[q, label_k]
        d_score = np.abs(cand_prob - scores[b][None, :])  # (Q, K)
        d_box = np.abs(ref_boxes[b][:, None, :] - boxes[b][None, :, :]).max(-1)  # (Q, K)
        cost = np.maximum(d_score / tolerance.score, d_box / tolerance.box_px)
        cost = np.where(np.isnan(cost), np.inf, cost)
        best = cost.argmin(0)  # (K,)
        k_idx = np.arange(scores.shape[1])
        for kind, d, diff in (("score", d_score, score_diff), ("box", d_box, box_diff)):
            matched = d[best, k_idx]
            matched = np.where(np.isnan(matched), np.inf, matched)
            k = int(matched.argmax())
            diff.update(float(matched[k]), f"image {b}, detection {k} (label {labels[b, k]}, matched to query "
                                           f"{best[k]})")
        ranked = np.abs(np.sort(scores[b])[::-1] - ref_scores[b])
        ranked = np.where(np.isnan(ranked), np.inf, ranked)
        k = int(ranked.argmax())
        score_diff.update(float(ranked[k]), f"image {b}, score rank {k}")
    return score_diff, box_diff


def reference_from_outputs(outputs: list | tuple, mask) -> DeployOutputs:
    """A :class:`DeployOutputs` from a graph's outputs ``(boxes, scores, labels, pred_logits, pred_boxes,
    query_indices)``."""
    boxes, scores, labels, logits, pred_boxes, indices = (torch.as_tensor(np.asarray(o)) if not torch.is_tensor(o)
                                                          else o.detach().cpu() for o in outputs)
    return DeployOutputs(boxes.float(), scores.float(), labels, logits.float(), pred_boxes.float(),
                         valid_sizes(torch.as_tensor(np.asarray(mask.cpu() if torch.is_tensor(mask) else mask))),
                         indices)


def reference_model(model: DeployModel) -> DeployModel:
    """The eager model a graph exported from ``model`` is checked against: ``model`` itself, or for a float16 model
    its float32 twin, so the float16 graph is held to float16's distance from float32 arithmetic
    (:data:`FP16_TOLERANCE`). PyTorch's own float16 is no reference on a CPU: its CPU kernels returned NaN for every
    query of dino_r50_4scale (random weights, 320x480) where ONNX Runtime's float16 graph and CUDA did not."""
    return model.float32_twin() if model.half else model


def check_outputs(model: DeployModel, images: Tensor, mask: Tensor, outputs: list | tuple, backend: str,
                  tolerance: Tolerance) -> QueryCheck:
    """Compares a graph's six outputs on ``(images, mask)``, ``(boxes, scores, labels, pred_logits, pred_boxes,
    query_indices)`` (numpy arrays or tensors), with eager ``model`` (see :func:`reference_model`), query by query;
    the check is returned, not raised.

    Where the graph selected other encoder tokens (near-tied proposals), ``model`` runs again on the graph's
    selection, and the selection itself must be a valid top-Q of PyTorch's scores (:func:`compare_selection`).
    The graph's top-k detections are compared with its own per-query outputs.
    """
    with torch.no_grad():
        reference = own = model.run(images, mask)
    check = QueryCheck(backend, images.shape[0], tolerance)
    selection = torch.as_tensor(np.asarray(outputs[5].cpu() if torch.is_tensor(outputs[5]) else outputs[5]))
    if not torch.equal(selection, own.query_indices.cpu()):
        with torch.no_grad():
            reference = model.run(images, mask, query_indices=selection.to(images.device))
    check.selection_score, check.reselected = compare_selection(own, reference)
    check.query_score, check.query_box = compare_queries(reference, outputs[3], outputs[4])
    graph_own = reference_from_outputs(outputs, mask)
    check.detection_score, check.detection_box = compare_detections(graph_own, *outputs[:3], tolerance=tolerance)
    return check
