"""DINO's set criterion: Hungarian-matched focal, L1 and GIoU losses for the last decoder layer, every auxiliary
decoder layer and the encoder proposals, plus the denoising losses (queries matched by construction).

Term names and normalisation follow the official IDEA-Research/DINO code so that ``weight_dict`` and logged values
compare one-to-one with it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from dino.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from dino.matcher import HungarianMatcher, build_matcher

Indices = list[tuple[Tensor, Tensor]]

# Everything a loss computation returns, so that the zero placeholders for a missing denoising part have every key.
_TERMS = ("loss_ce", "loss_bbox", "loss_giou", "loss_xy", "loss_hw", "cardinality_error")


def focal_loss(logits: Tensor, onehot: Tensor, num_boxes: float, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss normalised as in DINO: mean over queries, summed, times Q, divided by ``num_boxes``.

    Args:
        logits: (B, Q, C) class logits; onehot: (B, Q, C) {0, 1} targets (all zero for unmatched queries).
        num_boxes: number of target boxes the loss is normalised by (>= 1).
    """
    per_elem = sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma, reduction="none")
    return per_elem.mean(1).sum() / num_boxes * logits.shape[1]


def dn_indices(targets: list[dict], num_groups: int, single_pad: int) -> Indices:
    """Query/target pairs of the denoising positives, which are matched by construction.

    Group g's positive copy of image i's target j sits in slot ``g * single_pad + j`` (``single_pad = 2 * max_gt``).
    Returns per image ``(slots (G*N_i,), target_idx (G*N_i,))`` int64, group-major.
    """
    out = []
    for tgt in targets:
        n = len(tgt["labels"])
        device = tgt["labels"].device
        tgt_idx = torch.arange(n, device=device).repeat(num_groups)
        offsets = torch.arange(num_groups, device=device).repeat_interleave(n) * single_pad
        out.append((offsets + tgt_idx, tgt_idx))
    return out


def _src_permutation_idx(indices: Indices, device: torch.device) -> tuple[Tensor, Tensor]:
    """(batch_idx, query_idx) of every matched query, image-major, on ``device``."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx.to(device), src_idx.to(device)


def num_boxes_per_micro_batch(micro_batches: list[list[dict]], device: torch.device) -> float:
    """Target boxes per micro-batch, averaged over ``micro_batches`` (this process's accumulation group) and every
    process, at least 1: the official normaliser (boxes averaged over GPUs) when each micro-batch stands for one GPU.

    Every process must pass the same number of micro-batches. Float32 as the official code, so that one micro-batch
    on each process gives the official value bit for bit.
    """
    boxes = sum(len(t["labels"]) for targets in micro_batches for t in targets)
    total = torch.as_tensor([float(boxes)], dtype=torch.float, device=device)
    world = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        world = dist.get_world_size()
    return torch.clamp(total / (world * len(micro_batches)), min=1).item()


def _num_boxes(targets: list[dict], device: torch.device) -> float:
    """Number of target boxes averaged over processes (so each process normalises alike), at least 1."""
    return num_boxes_per_micro_batch([targets], device)


class SetCriterion(nn.Module):
    """Computes DINO's unweighted loss terms; ``weight_dict`` maps the trained terms to their weights.

    Returns from ``forward`` a dict with ``loss_ce``, ``loss_bbox``, ``loss_giou`` (+ diagnostics ``loss_xy``,
    ``loss_hw``, ``cardinality_error``, ``class_error``) for the last layer, the same with ``_0``.. suffixes for the
    auxiliary layers, ``_interm`` for the encoder proposals and ``_dn`` / ``_dn_0``.. for denoising.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    # --- single-output losses -------------------------------------------------------------------------------------

    def loss_labels(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float, log: bool = True) -> dict:
        """Focal loss over all queries and classes; unmatched queries are negatives for every class."""
        logits = outputs["pred_logits"]
        idx = _src_permutation_idx(indices, logits.device)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        onehot = torch.zeros_like(logits)
        onehot[idx[0], idx[1], matched_labels] = 1
        losses = {"loss_ce": focal_loss(logits, onehot, num_boxes, self.focal_alpha, self.focal_gamma)}
        if log:
            losses["class_error"] = self._class_error(logits[idx], matched_labels)
        return losses

    @staticmethod
    @torch.no_grad()
    def _class_error(matched_logits: Tensor, labels: Tensor) -> Tensor:
        """100 - top-1 accuracy (%) of the matched queries; 100 when nothing is matched (official)."""
        if labels.numel() == 0:
            return torch.full((), 100.0, device=matched_logits.device)
        correct = (matched_logits.argmax(-1) == labels).float().sum()
        return 100 - correct * (100.0 / labels.numel())

    @torch.no_grad()
    def loss_cardinality(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float) -> dict:
        """Logging only: |number of queries whose arg-max class is not the last class - number of targets|, averaged.

        This is the official (DETR-inherited) definition; with sigmoid classes it mostly counts all queries.
        """
        logits = outputs["pred_logits"]
        tgt_lengths = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device, dtype=torch.float)
        card_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        return {"cardinality_error": F.l1_loss(card_pred, tgt_lengths)}

    def loss_boxes(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float) -> dict:
        """L1 and (1 - GIoU) of the matched boxes, each summed and divided by ``num_boxes``."""
        pred = outputs["pred_boxes"]
        idx = _src_permutation_idx(indices, pred.device)
        src = pred[idx]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0).to(pred)
        l1 = F.l1_loss(src, tgt, reduction="none")
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
        losses = {
            "loss_bbox": l1.sum() / num_boxes,
            "loss_giou": (1 - giou).sum() / num_boxes,
        }
        with torch.no_grad():
            losses["loss_xy"] = l1[:, :2].sum() / num_boxes
            losses["loss_hw"] = l1[:, 2:].sum() / num_boxes
        return losses

    def _all_losses(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float, log: bool) -> dict:
        losses = self.loss_labels(outputs, targets, indices, num_boxes, log=log)
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        losses.update(self.loss_cardinality(outputs, targets, indices, num_boxes))
        return losses

    # --- the whole model output -----------------------------------------------------------------------------------

    def forward(self, outputs: dict, targets: list[dict], num_boxes: float | None = None) -> dict[str, Tensor]:
        """Computes every loss term.

        Args:
            outputs: the model's output dict (docs/ARCHITECTURE.md): ``pred_logits (B, Q, C)``, ``pred_boxes (B, Q, 4)``
                cxcywh in [0, 1], optional ``aux_outputs``, ``interm_outputs``, ``dn_meta``.
            targets: B dicts, ``labels (N_i,)`` int64 in [0, C), ``boxes (N_i, 4)`` cxcywh in [0, 1].
            num_boxes: the box count the losses are divided by (>= 1); None: ``targets``' count averaged over the
                processes (official). Gradient accumulation passes the group's count (:func:`num_boxes_per_micro_batch`).
        Returns:
            dict of unweighted scalar tensors (see the class docstring).
        """
        logits = outputs["pred_logits"]
        self._check_targets(outputs, targets)
        if num_boxes is None:
            num_boxes = _num_boxes(targets, logits.device)
        elif not num_boxes >= 1:
            raise ValueError(f"num_boxes must be >= 1, got {num_boxes}")
        zero = logits.new_zeros(())

        losses = {}
        dn_meta = outputs.get("dn_meta")
        dn_out = dn_meta.get("output_known_lbs_bboxes") if dn_meta else None
        if dn_out is not None:
            num_groups, pad_size = int(dn_meta["num_dn_group"]), int(dn_meta["pad_size"])
            if num_groups < 1 or pad_size % num_groups != 0:
                raise ValueError(f"dn_meta: pad_size {pad_size} is not a multiple of num_dn_group {num_groups}")
            dn_idx = dn_indices(targets, num_groups, pad_size // num_groups)
            dn_norm = num_boxes * num_groups
            losses.update(_suffixed(self._all_losses(dn_out, targets, dn_idx, dn_norm, log=False), "_dn"))
        else:
            # Official: the denoising terms exist (as zeros) even when no denoising queries were built.
            losses.update({f"{k}_dn": zero for k in _TERMS})

        indices = self.matcher(outputs, targets)
        losses.update(self._all_losses(outputs, targets, indices, num_boxes, log=True))

        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            aux_indices = self.matcher(aux, targets)
            losses.update(_suffixed(self._all_losses(aux, targets, aux_indices, num_boxes, log=False), f"_{i}"))
            if dn_out is not None:
                dn_aux = dn_out["aux_outputs"][i]
                losses.update(_suffixed(self._all_losses(dn_aux, targets, dn_idx, dn_norm, log=False), f"_dn_{i}"))
            else:
                losses.update({f"{k}_dn_{i}": zero for k in _TERMS})

        interm = outputs.get("interm_outputs")
        if interm is not None:
            interm_indices = self.matcher(interm, targets)
            losses.update(_suffixed(self._all_losses(interm, targets, interm_indices, num_boxes, log=False), "_interm"))
        return losses

    def _check_targets(self, outputs: dict, targets: list[dict]) -> None:
        batch = outputs["pred_logits"].shape[0]
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} targets for a batch of {batch} predictions")
        for i, t in enumerate(targets):
            if "labels" not in t or "boxes" not in t:
                raise ValueError(f"targets[{i}] must have 'labels' and 'boxes', has {sorted(t)}")
            labels, boxes = t["labels"], t["boxes"]
            if labels.dim() != 1 or labels.dtype != torch.int64:
                raise ValueError(f"targets[{i}]['labels'] must be a 1-D int64 tensor, got {labels.dtype} {tuple(labels.shape)}")
            if boxes.dim() != 2 or boxes.shape[1] != 4 or boxes.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"targets[{i}]['boxes'] must be ({labels.shape[0]}, 4) cxcywh, got {tuple(boxes.shape)}"
                )
        labels = torch.cat([t["labels"] for t in targets])
        # One device sync per step; a label == num_classes would otherwise silently count as background.
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"target labels must lie in [0, num_classes={self.num_classes}), got min {int(labels.min())} "
                f"max {int(labels.max())}"
            )


def _suffixed(losses: dict, suffix: str) -> dict:
    return {k + suffix: v for k, v in losses.items()}


def build_weight_dict(model_cfg) -> dict[str, float]:
    """Official loss weights: ce/bbox/giou for the last layer, denoising (when enabled), each auxiliary layer and
    the encoder proposals (times ``interm_loss_coef``; no denoising part there)."""
    lc = model_cfg.loss
    base = {"loss_ce": lc.cls_loss_coef, "loss_bbox": lc.bbox_loss_coef, "loss_giou": lc.giou_loss_coef}
    per_layer = dict(base)
    if model_cfg.denoising.enabled:
        per_layer.update({f"{k}_dn": v * lc.dn_loss_coef for k, v in base.items()})
    weights = dict(per_layer)
    if lc.aux_loss:
        for i in range(model_cfg.transformer.dec_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in per_layer.items()})
    weights.update({f"{k}_interm": v * lc.interm_loss_coef for k, v in base.items()})
    return weights


def build_criterion(model_cfg) -> SetCriterion:
    """Builds the criterion (matcher, weights, focal parameters) from a :class:`dino.config.ModelConfig`."""
    return SetCriterion(
        num_classes=model_cfg.num_classes,
        matcher=build_matcher(model_cfg.matcher),
        weight_dict=build_weight_dict(model_cfg),
        focal_alpha=model_cfg.loss.focal_alpha,
        focal_gamma=model_cfg.loss.focal_gamma,
    )
