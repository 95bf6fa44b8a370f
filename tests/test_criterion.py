import pytest
import torch

from dino.config import ModelConfig
from dino.criterion import SetCriterion, build_criterion, dn_indices, focal_loss
from dino.matcher import HungarianMatcher

NUM_CLASSES = 5
NUM_QUERIES = 6
DEC_LAYERS = 3


def _targets(seed=0, sizes=(2, 1)):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "labels": torch.randint(0, NUM_CLASSES, (n,), generator=g),
            "boxes": torch.rand(n, 4, generator=g, dtype=torch.float64) * 0.4 + 0.3,
        }
        for n in sizes
    ]


def _head(g, batch, queries):
    return {
        "pred_logits": torch.randn(batch, queries, NUM_CLASSES, generator=g, dtype=torch.float64, requires_grad=True),
        "pred_boxes": (torch.rand(batch, queries, 4, generator=g, dtype=torch.float64) * 0.4 + 0.3).requires_grad_(),
    }


def _outputs(seed=0, batch=2, dn_groups=None, max_gt=2):
    g = torch.Generator().manual_seed(seed)
    out = _head(g, batch, NUM_QUERIES)
    out["aux_outputs"] = [_head(g, batch, NUM_QUERIES) for _ in range(DEC_LAYERS - 1)]
    out["interm_outputs"] = _head(g, batch, NUM_QUERIES)
    if dn_groups:
        pad = dn_groups * 2 * max_gt
        known = _head(g, batch, pad)
        known["aux_outputs"] = [_head(g, batch, pad) for _ in range(DEC_LAYERS - 1)]
        out["dn_meta"] = {"pad_size": pad, "num_dn_group": dn_groups, "output_known_lbs_bboxes": known}
    return out


def _criterion(weight_dict=None):
    return SetCriterion(NUM_CLASSES, HungarianMatcher(), weight_dict or {"loss_ce": 1.0})


def _expected_keys(num_aux):
    terms = ["loss_ce", "loss_bbox", "loss_giou", "loss_xy", "loss_hw", "cardinality_error"]
    keys = set(terms) | {"class_error"} | {t + "_dn" for t in terms} | {t + "_interm" for t in terms}
    for i in range(num_aux):
        keys |= {f"{t}_{i}" for t in terms} | {f"{t}_dn_{i}" for t in terms}
    return keys


@pytest.mark.parametrize("dn_groups", [None, 2])
def test_all_terms_present_and_finite(dn_groups):
    losses = _criterion()(_outputs(dn_groups=dn_groups), _targets())
    assert set(losses) == _expected_keys(DEC_LAYERS - 1)
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    dn_terms = [k for k in losses if "_dn" in k and k.startswith("loss_")]
    if dn_groups:
        assert all(losses[k] > 0 for k in dn_terms)
    else:
        assert all(losses[k] == 0 for k in dn_terms)


def test_gradients_reach_every_output():
    out = _outputs(dn_groups=2)
    crit = build_criterion(_small_cfg())
    losses = crit(out, _targets())
    total = sum(losses[k] * w for k, w in crit.weight_dict.items() if k in losses)
    total.backward()
    heads = [out, out["interm_outputs"], *out["aux_outputs"]]
    known = out["dn_meta"]["output_known_lbs_bboxes"]
    heads += [known, *known["aux_outputs"]]
    for h in heads:
        assert h["pred_logits"].grad.abs().sum() > 0
        assert h["pred_boxes"].grad.abs().sum() > 0


def test_perfect_boxes_give_zero_box_losses():
    targets = _targets(sizes=(2, 3))
    out = _outputs()
    with torch.no_grad():
        for i, t in enumerate(targets):
            n = len(t["labels"])
            out["pred_boxes"][i, :n] = t["boxes"]
            out["pred_logits"][i] = -10.0
            out["pred_logits"][i, torch.arange(n), t["labels"]] = 10.0
    losses = _criterion()(out, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0, abs=1e-12)
    # not exactly 0: official GIoU adds 1e-6 to the areas (about eps / area per box)
    assert losses["loss_giou"].item() == pytest.approx(0, abs=1e-4)
    assert losses["class_error"].item() == 0
    assert losses["loss_ce"].item() < 1e-6


def test_focal_normalisation_matches_formula():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    onehot = torch.zeros_like(logits)
    onehot[0, 1, 2] = 1
    onehot[1, 3, 0] = 1
    p = logits.sigmoid()
    pt = torch.where(onehot > 0, p, 1 - p)
    at = torch.where(onehot > 0, 0.25, 0.75)
    expected = (-at * (1 - pt) ** 2 * pt.log()).sum() / 2.0
    torch.testing.assert_close(focal_loss(logits, onehot, num_boxes=2.0), expected)


def test_box_losses_hand_case():
    out = {
        "pred_logits": torch.zeros(1, 2, NUM_CLASSES, dtype=torch.float64),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]], dtype=torch.float64),
    }
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.6, 0.5, 0.2, 0.2]], dtype=torch.float64)}]
    losses = _criterion()(out, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.1)
    assert losses["loss_xy"].item() == pytest.approx(0.1) and losses["loss_hw"].item() == pytest.approx(0)
    # overlap 0.1x0.2, union 0.06, hull 0.3x0.2 = union: GIoU = IoU = 1/3 (with the official 1e-6 on the union)
    assert losses["loss_giou"].item() == pytest.approx(1 - 0.02 / (0.06 + 1e-6), rel=1e-9)
    # all logits equal: arg-max is class 0 (not the last class) for both queries; |2 - 1| = 1
    assert losses["cardinality_error"].item() == 1
    assert losses["class_error"].item() == 100


def test_dn_positives_are_matched_by_construction():
    targets = _targets(sizes=(2, 1))
    idx = dn_indices(targets, num_groups=2, single_pad=4)
    assert idx[0][0].tolist() == [0, 1, 4, 5] and idx[0][1].tolist() == [0, 1, 0, 1]
    assert idx[1][0].tolist() == [0, 4] and idx[1][1].tolist() == [0, 0]

    out = _outputs(dn_groups=2, max_gt=2)
    known = out["dn_meta"]["output_known_lbs_bboxes"]
    losses = _criterion()(out, targets)
    pred = known["pred_boxes"].detach()
    l1 = sum((pred[i, s] - targets[i]["boxes"][t]).abs().sum() for i, (s, t) in enumerate(idx))
    # normalised by num_boxes (3) x groups (2)
    assert losses["loss_bbox_dn"].item() == pytest.approx(l1.item() / 6)
    logits = known["pred_logits"].detach()
    onehot = torch.zeros_like(logits)
    for i, (s, t) in enumerate(idx):
        onehot[i, s, targets[i]["labels"][t]] = 1
    assert losses["loss_ce_dn"].item() == pytest.approx(focal_loss(logits, onehot, 6.0).item())


def test_images_without_targets():
    out = _outputs(dn_groups=1, max_gt=1)
    losses = _criterion()(out, _targets(sizes=(0, 1)))
    assert all(torch.isfinite(v) for v in losses.values())
    losses = _criterion()(_outputs(), _targets(sizes=(0, 0)))
    assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0
    assert losses["class_error"] == 100
    # num_boxes clamps to 1: ce is the plain sum of the all-negative focal terms
    logits = _outputs()["pred_logits"].detach()
    assert losses["loss_ce"].item() == pytest.approx(focal_loss(logits, torch.zeros_like(logits), 1.0).item())


def _small_cfg():
    cfg = ModelConfig()
    cfg.num_classes = NUM_CLASSES
    cfg.transformer.dec_layers = DEC_LAYERS
    return cfg


def test_weight_dict_official_recipe():
    cfg = ModelConfig(num_classes=91)
    w = build_criterion(cfg).weight_dict
    assert len(w) == 3 + 3 + 5 * 6 + 3
    for suffix in ["", "_dn", "_0", "_4", "_dn_0", "_dn_4", "_interm"]:
        assert (w["loss_ce" + suffix], w["loss_bbox" + suffix], w["loss_giou" + suffix]) == (1.0, 5.0, 2.0)
    assert "loss_ce_5" not in w and "loss_ce_dn_interm" not in w and "class_error" not in w
    cfg.loss.interm_loss_coef = 0.5
    cfg.denoising.enabled = False
    cfg.loss.aux_loss = False
    w = build_criterion(cfg).weight_dict
    assert w == {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0,
                 "loss_ce_interm": 0.5, "loss_bbox_interm": 2.5, "loss_giou_interm": 1.0}


def test_bad_targets_are_named():
    crit = _criterion()
    out = _outputs()
    bad = _targets()
    bad[1]["labels"] = torch.tensor([NUM_CLASSES])
    with pytest.raises(ValueError, match="num_classes=5"):
        crit(out, bad)
    bad = _targets()
    bad[0]["boxes"] = bad[0]["boxes"][:, :3]
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]"):
        crit(out, bad)
    bad = _targets()
    bad[0]["labels"] = bad[0]["labels"].float()
    with pytest.raises(ValueError, match="int64"):
        crit(out, bad)
    with pytest.raises(ValueError, match="batch of 2"):
        crit(out, _targets()[:1])


def test_bfloat16_outputs():
    out = _outputs(dn_groups=1)

    def cast(d):
        return {k: (v.detach().to(torch.bfloat16).requires_grad_() if torch.is_tensor(v) else v) for k, v in d.items()}

    out = {**cast(out), "aux_outputs": [cast(a) for a in out["aux_outputs"]], "interm_outputs": cast(out["interm_outputs"])}
    losses = _criterion()(out, _targets())
    assert all(torch.isfinite(v.float()) for v in losses.values())
    losses["loss_ce"].backward()
    assert out["pred_logits"].grad is not None


def test_num_boxes_is_averaged_over_processes(monkeypatch):
    import dino.criterion as criterion_module

    # Simulates a second process holding 5 target boxes: the all-reduced sum is 3 + 5, averaged over 2 processes.
    def fake_all_reduce(tensor):
        tensor += 5

    monkeypatch.setattr(criterion_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(criterion_module.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(criterion_module.dist, "all_reduce", fake_all_reduce)
    assert criterion_module._num_boxes(_targets(sizes=(2, 1)), torch.device("cpu")) == 4.0
    out = _outputs()
    losses = _criterion()(out, _targets(sizes=(2, 1)))
    monkeypatch.undo()
    single = _criterion()(out, _targets(sizes=(2, 1)))
    assert losses["loss_bbox"].item() == pytest.approx(single["loss_bbox"].item() * 3 / 4)


def test_a_given_num_boxes_normalises_every_term():
    # Gradient accumulation passes the group's box count; every loss term (denoising too) scales with 1 / num_boxes.
    out, targets = _outputs(dn_groups=2), _targets(sizes=(2, 1))
    own = _criterion()(out, targets)  # 3 boxes
    given = _criterion()(out, targets, num_boxes=7.5)
    for k in ("loss_ce", "loss_bbox", "loss_giou", "loss_bbox_dn", "loss_ce_dn_0", "loss_giou_interm"):
        assert given[k].item() == pytest.approx(own[k].item() * 3 / 7.5, rel=1e-12), k
    with pytest.raises(ValueError, match=r"^num_boxes must be >= 1, got 0.5$"):
        _criterion()(out, targets, num_boxes=0.5)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    """Indices from the matcher live on the CPU; the losses must not care where the outputs and targets live."""
    out, targets = _outputs(dn_groups=2), _targets(sizes=(2, 0))
    cpu = _criterion()(out, targets)

    def move(x):
        if torch.is_tensor(x):
            return x.detach().cuda()
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        if isinstance(x, list):
            return [move(v) for v in x]
        return x

    gpu = _criterion()(move(out), move(targets))
    assert set(gpu) == set(cpu)
    for k in cpu:
        assert gpu[k].device.type == "cuda", k
        torch.testing.assert_close(gpu[k].cpu().to(cpu[k].dtype), cpu[k], rtol=1e-9, atol=1e-9, msg=k)
