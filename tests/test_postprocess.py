from pathlib import Path

import pytest
import torch

from dino.postprocess import PostProcess, postprocess

# The official eval-mode outputs and post-processing results (a trimmed copy of shared/parity's 4-scale golden).
GOLDEN = Path(__file__).parent / "fixtures" / "parity" / "golden_r50_4scale.safetensors"


def _hand_case():
    # B=1, Q=3, C=2; probabilities chosen so the top-3 order is known.
    probs = torch.tensor([[[0.10, 0.70], [0.90, 0.20], [0.30, 0.60]]], dtype=torch.float64)
    logits = torch.logit(probs)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.5, 0.5], [0.75, 0.5, 0.1, 0.2]]], dtype=torch.float64)
    return probs, logits, boxes


def test_hand_computed_top_k():
    probs, logits, boxes = _hand_case()
    sizes = torch.tensor([[100, 200]])  # h=100, w=200
    scores, labels, out_boxes = postprocess(logits, boxes, sizes, num_select=3)
    torch.testing.assert_close(scores, torch.tensor([[0.9, 0.7, 0.6]], dtype=torch.float64))
    # flat indices 2, 1, 5 -> queries 1, 0, 2; labels 0, 1, 1
    assert labels.dtype == torch.int64 and labels.tolist() == [[0, 1, 1]]
    expected = torch.tensor([[[0.0, 0.0, 100.0, 50.0], [80.0, 30.0, 120.0, 70.0], [140.0, 40.0, 160.0, 60.0]]],
                            dtype=torch.float64)
    torch.testing.assert_close(out_boxes, expected)


def test_module_returns_per_image_dicts_and_caps_k():
    probs, logits, boxes = _hand_case()
    logits = torch.cat([logits, logits.flip(1)])
    boxes = torch.cat([boxes, boxes.flip(1)])
    results = PostProcess(num_select=100)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[10, 10], [20, 20]]))
    assert len(results) == 2
    assert results[0]["scores"].shape == (6,) and results[0]["boxes"].shape == (6, 4)  # capped at Q*C
    # flipped queries: the best (0.9) is now query 1 of 3 still (middle), label 0; the 0.7 comes from query 2
    assert results[1]["labels"][:2].tolist() == [0, 1]
    torch.testing.assert_close(results[1]["boxes"][1], torch.tensor([4.0, 3.0, 6.0, 7.0], dtype=torch.float64) * 2)


def test_exported_graph_matches_eager():
    class Wrap(torch.nn.Module):
        def forward(self, logits, boxes, sizes):
            return postprocess(logits, boxes, sizes, num_select=5)

    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 7, 3, generator=g), torch.rand(2, 7, 4, generator=g), torch.tensor([[30, 40], [50, 60]]))
    program = torch.export.export(Wrap(), args)
    other = (torch.randn(2, 7, 3, generator=g), torch.rand(2, 7, 4, generator=g), torch.tensor([[10, 20], [70, 80]]))
    for got, want in zip(program.module()(*other), Wrap()(*other)):
        torch.testing.assert_close(got, want)


def test_bad_input_errors():
    _, logits, boxes = _hand_case()
    with pytest.raises(ValueError, match="target_sizes"):
        postprocess(logits, boxes, torch.tensor([100, 200]), 3)
    with pytest.raises(ValueError, match="num_select"):
        postprocess(logits, boxes, torch.tensor([[100, 200]]), 0)
    with pytest.raises(ValueError, match="pred_boxes"):
        postprocess(logits, boxes[..., :2], torch.tensor([[100, 200]]), 3)
    with pytest.raises(ValueError, match="target_sizes"):
        PostProcess(3)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[1, 2], [3, 4]]))


def test_matches_official_post_processing():
    from safetensors.torch import load_file

    d = load_file(str(GOLDEN))
    scores, labels, boxes = postprocess(d["pred_logits"], d["pred_boxes"], torch.tensor([[320, 480], [288, 384]]), 300)
    for i in range(2):
        torch.testing.assert_close(scores[i], d[f"post{i}_scores"], rtol=0, atol=1e-12)
        assert torch.equal(labels[i], d[f"post{i}_labels"])
        torch.testing.assert_close(boxes[i], d[f"post{i}_boxes"], rtol=0, atol=1e-9)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(1)
    logits, boxes = torch.randn(2, 9, 4, generator=g), torch.rand(2, 9, 4, generator=g)
    sizes = torch.tensor([[30, 40], [50, 60]])
    for got, want in zip(postprocess(logits.cuda(), boxes.cuda(), sizes.cuda(), 7), postprocess(logits, boxes, sizes, 7)):
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), want)
