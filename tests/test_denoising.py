"""Contrastive denoising queries and their attention mask."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dino.errors import UserError
from dino.models.anchors import inverse_sigmoid
from dino.models.denoising import build_cdn_queries, build_dn_attn_mask, num_dn_groups


def test_attn_mask_blocks_matching_from_dn_and_groups_from_each_other():
    max_gt, groups, nq = 2, 3, 5
    mask = build_dn_attn_mask(max_gt, groups, nq)
    pad = 2 * max_gt * groups
    assert mask.shape == (pad + nq, pad + nq) and mask.dtype == torch.bool
    assert mask[pad:, :pad].all(), "matching queries must not see denoising queries"
    assert not mask[pad:, pad:].any(), "matching queries see each other"
    assert not mask[:pad, pad:].any(), "denoising queries see the matching queries"
    for g in range(groups):
        rows = slice(g * 2 * max_gt, (g + 1) * 2 * max_gt)
        assert not mask[rows, rows].any(), f"group {g} sees itself (positives and negatives)"
        others = torch.ones(pad, dtype=torch.bool)
        others[rows] = False
        assert mask[rows][:, :pad][:, others].all(), f"group {g} must not see other groups"


def test_attn_mask_matches_official_loop_construction():
    max_gt, groups, nq = 3, 4, 7
    pad = 2 * max_gt * groups
    ref = torch.zeros(pad + nq, pad + nq, dtype=torch.bool)
    ref[pad:, :pad] = True
    for i in range(groups):
        ref[max_gt * 2 * i : max_gt * 2 * (i + 1), max_gt * 2 * (i + 1) : pad] = True
        ref[max_gt * 2 * i : max_gt * 2 * (i + 1), : max_gt * 2 * i] = True
    assert torch.equal(build_dn_attn_mask(max_gt, groups, nq), ref)


def _targets():
    return [
        {"labels": torch.tensor([3, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]])},
        {"labels": torch.tensor([2, 0, 4]),
         "boxes": torch.tensor([[0.4, 0.4, 0.2, 0.2], [0.6, 0.5, 0.3, 0.2], [0.5, 0.3, 0.2, 0.1]])},
    ]


def test_layout_without_noise():
    enc = nn.Embedding(6, 8)
    targets = _targets()
    label, bbox, mask, meta = build_cdn_queries(targets, dn_number=6, label_noise_ratio=0.0, box_noise_scale=0.0,
                                                num_classes=5, label_enc=enc, num_queries=4)
    max_gt, groups = 3, 2
    assert meta == {"pad_size": 2 * max_gt * groups, "num_dn_group": groups}
    assert label.shape == (2, 12, 8) and bbox.shape == (2, 12, 4) and mask.shape == (16, 16)
    for b, t in enumerate(targets):
        n = len(t["labels"])
        for copy in range(2 * groups):  # positive, negative, positive, negative
            slots = slice(copy * max_gt, copy * max_gt + n)
            torch.testing.assert_close(bbox[b, slots], inverse_sigmoid(t["boxes"]))
            torch.testing.assert_close(label[b, slots], enc(t["labels"]))
            # Padding slots of the smaller image stay empty.
            assert (bbox[b, copy * max_gt + n : (copy + 1) * max_gt] == 0).all()


def test_box_noise_positives_inside_negatives_outside():
    torch.manual_seed(0)
    enc = nn.Embedding(6, 8)
    # Boxes small and central, so the [0, 1] clamp never acts.
    targets = [{"labels": torch.arange(5), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.08]]).repeat(5, 1)}]
    scale = 0.4
    _, bbox, _, meta = build_cdn_queries(targets, 50, 0.0, scale, 5, enc, num_queries=4)
    boxes = bbox[0].sigmoid().view(meta["num_dn_group"], 2, 5, 4)  # group, pos/neg, box, cxcywh
    xyxy = torch.cat([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], -1)
    gt = torch.tensor([0.45, 0.46, 0.55, 0.54])
    half = torch.tensor([0.05, 0.04, 0.05, 0.04]) * scale
    # inverse_sigmoid/sigmoid round trip costs ~1e-7.
    assert ((xyxy[:, 0] - gt).abs() <= half + 1e-5).all(), "positives move less than 1x the noise scale"
    move = (xyxy[:, 1] - gt).abs()
    assert ((move >= half - 1e-5) & (move <= 2 * half + 1e-5)).all(), "negatives move 1x-2x the noise scale"


def test_label_noise_flips_some_labels_only_when_asked():
    torch.manual_seed(0)
    enc = nn.Embedding(92, 4)
    targets = [{"labels": torch.full((10,), 7), "boxes": torch.full((10, 4), 0.5)}]
    label, *_ = build_cdn_queries(targets, 100, 0.0, 0.0, 91, enc, num_queries=3)
    assert torch.allclose(label[0], enc.weight[7].expand_as(label[0]))
    label, *_ = build_cdn_queries(targets, 100, 1.0, 0.0, 91, enc, num_queries=3)
    changed = ~torch.isclose(label[0], enc.weight[7]).all(-1)
    assert 0.2 < changed.float().mean() < 0.8, "ratio 1.0 flips about half of the labels"


def test_groups_follow_budget_and_empty_targets():
    assert num_dn_groups(100, 3) == 33 and num_dn_groups(100, 200) == 1 and num_dn_groups(20, 7) == 2
    enc = nn.Embedding(4, 8)
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    assert build_cdn_queries(empty, 100, 0.5, 1.0, 3, enc, num_queries=3) is None


def test_out_of_range_label_is_a_clear_error():
    enc = nn.Embedding(4, 8)
    targets = [{"labels": torch.tensor([5]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])}]
    with pytest.raises(ValueError, match=r"labels must be in \[0, model.num_classes=3\).*max 5"):
        build_cdn_queries(targets, 10, 0.5, 1.0, 3, enc, num_queries=3)


def test_more_classes_than_the_label_book_is_a_clear_error():
    """Official #81: replacement labels are drawn in [0, num_classes) and would index past a smaller label book at
    random steps (IndexError on the CPU, a device-side assert on CUDA); it fails on the first call instead."""
    enc = nn.Embedding(4, 8)  # labelbook_size 3
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])}]
    with pytest.raises(UserError, match=r"model.num_classes=5 is larger than the label book "
                                        r"\(model.denoising.labelbook_size=3\); set model.denoising.labelbook_size=5"):
        build_cdn_queries(targets, 10, 0.0, 0.0, 5, enc, num_queries=3)
    assert build_cdn_queries(targets, 10, 0.5, 1.0, 3, enc, num_queries=3) is not None  # a full book is fine
