import pytest
import torch

from dino.box_ops import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    elementwise_generalized_box_iou,
    generalized_box_iou,
)


def test_cxcywh_to_xyxy_hand_case():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.2, 0.2, 0.2]])
    expected = torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.0, 0.1, 0.2, 0.3]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(boxes), expected)


def test_round_trip_keeps_batch_dims():
    boxes = torch.rand(2, 7, 4, dtype=torch.float64)
    back = box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes))
    assert back.shape == (2, 7, 4)
    torch.testing.assert_close(back, boxes)


def test_giou_hand_cases():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0], [3.0, 0.0, 4.0, 1.0]])
    giou = generalized_box_iou(a, b)
    # identical: 1; overlap 1 / union 7, hull 9: 1/7 - 2/9; disjoint: hull 4x2=8, union 5: 0 - 3/8
    torch.testing.assert_close(giou, torch.tensor([[1.0, 1 / 7 - 2 / 9, -3 / 8]]))


def test_giou_eps_is_official_and_zero_eps_is_torchvision():
    import torchvision

    g = torch.Generator().manual_seed(1)
    a = box_cxcywh_to_xyxy(torch.rand(5, 4, generator=g, dtype=torch.float64) * 0.1 + 0.2)
    b = box_cxcywh_to_xyxy(torch.rand(3, 4, generator=g, dtype=torch.float64) * 0.1 + 0.2)
    torch.testing.assert_close(generalized_box_iou(a, b, eps=0.0), torchvision.ops.generalized_box_iou(a, b))
    # official: inter / (union + 1e-6) - (hull - union) / (hull + 1e-6), here on one hand-made pair
    x = torch.tensor([[0.0, 0.0, 0.02, 0.02]], dtype=torch.float64)
    y = torch.tensor([[0.01, 0.01, 0.03, 0.03]], dtype=torch.float64)
    inter, union, hull = 1e-4, 7e-4, 9e-4
    expected = inter / (union + 1e-6) - (hull - union) / (hull + 1e-6)
    assert generalized_box_iou(x, y).item() == pytest.approx(expected, rel=1e-12)
    assert abs(expected - (1 / 7 - 2 / 9)) > 1e-5  # the eps matters at this scale


def test_elementwise_giou_equals_diagonal():
    g = torch.Generator().manual_seed(0)
    a = box_cxcywh_to_xyxy(torch.rand(6, 4, generator=g, dtype=torch.float64))
    b = box_cxcywh_to_xyxy(torch.rand(6, 4, generator=g, dtype=torch.float64))
    torch.testing.assert_close(elementwise_generalized_box_iou(a, b), generalized_box_iou(a, b).diagonal(), rtol=0, atol=0)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="boxes"):
        box_cxcywh_to_xyxy(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="same shape"):
        elementwise_generalized_box_iou(torch.zeros(3, 4), torch.zeros(2, 4))
