"""Loss parity with the official DINO criterion (README of shared/parity, "Loss golden").

The official R50 4-scale model, filled with the seed-0 deterministic weights, run in float64 in train mode with
denoising off on the golden images and targets, must give every official loss term to 1e-10 relative (measured:
7.8e-16 on a 2-core CPU; the margin is for other BLAS summation orders only).
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dino
from dino import convert, presets
from dino.criterion import build_criterion
from tests.official_weights import fill, official_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "loss" / "official_r50_4scale_loss_golden.safetensors"
KEYS = FIXTURES / "parity" / "official_keys_r50_4scale.txt"
PRESET = "dino_r50_4scale"


def test_fill_rule_reproduces_key_list():
    sd = official_state_dict(KEYS)
    assert len(sd) == 626
    # Reference values written once by shared/parity/fill_rule.py (seed 0, float32 then summed in float64).
    for key, total, first in [
        ("transformer.level_embed", 0.7190103687644296, 0.019536910578608513),
        ("backbone.0.body.bn1.running_var", 64.26887106895447, 0.9525518417358398),
        ("backbone.0.body.bn1.weight", 63.48860973119736, 0.978046715259552),
        ("transformer.tgt_embed.weight", 14.492895313005889, 0.042461737990379333),
    ]:
        assert sd[key].dtype == torch.float32
        assert sd[key].double().sum().item() == pytest.approx(total, rel=1e-12), key
        assert sd[key].flatten()[0].item() == first, key
    assert torch.equal(fill("a.weight", (3, 4), 0), fill("a.weight", (3, 4), 0))
    assert not torch.equal(fill("a.weight", (3, 4), 0), fill("a.weight", (3, 4), 1))


@pytest.mark.golden
def test_official_losses_reproduced():
    golden = load_file(str(GOLDEN))
    cfg = presets.get_preset(PRESET)
    cfg.denoising.enabled = False
    model = dino.build_model(cfg)
    model.load_state_dict(convert.convert_official_state_dict(official_state_dict(KEYS), PRESET))
    model.double().train()
    targets = [{"labels": golden[f"target{i}_labels"], "boxes": golden[f"target{i}_boxes"]} for i in range(2)]
    criterion = build_criterion(cfg)
    with torch.no_grad():
        outputs = model(golden["images"], golden["mask"], targets)
        losses = criterion(outputs, targets)

    expected = {k[len("loss."):]: v for k, v in golden.items() if k.startswith("loss.")}
    assert set(expected) == set(losses), f"missing {set(expected) - set(losses)}, extra {set(losses) - set(expected)}"
    errors = {k: abs(losses[k].item() - v.item()) / max(1.0, abs(v.item())) for k, v in expected.items()}
    print(f"loss parity: max relative error {max(errors.values()):.3g} ({max(errors, key=errors.get)})")
    bad = {
        k: (losses[k].item(), v.item())
        for k, v in expected.items()
        if errors[k] > 1e-10
    }
    assert not bad, "terms off (ours, official): " + ", ".join(f"{k}={bad[k]}" for k in sorted(bad))
    weights = build_criterion(presets.get_preset(PRESET)).weight_dict
    total = sum(losses[k] * w for k, w in weights.items() if k in losses).item()
    assert total == pytest.approx(golden["loss_total_weighted"].item(), rel=1e-9)
