"""Training parity with the official DINO (shared/parity README, "Training golden").

The official R50 4-scale model, filled with the seed-0 deterministic weights, in float64 with noise-free denoising
(dn_number 100), trained two steps on one batch by the official ``train_one_epoch``. Here the same two steps run
through our own loop (:func:`dino.engine.one_epoch.train_one_epoch`: weighted losses, backward, clip 0.1) and our
optimizer builder (AdamW, backbone group at lr_backbone): every loss term, every gradient, the pre-clip norm and the
parameter updates must match to 1e-8 relative.

The golden (4 MB) is read from the shared parity folder beside the clone (``../shared/parity``), as CI places it;
the test skips when that folder is absent.
"""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dino
from dino import convert
from dino.convert import _official_name
from dino.criterion import build_criterion
from dino.engine.checkpointer import Progress
from dino.engine.one_epoch import train_one_epoch
from dino.engine.optim import build_optimizer
from dino.engine.recipe import load_recipe
from dino.engine.setup import build_accelerator
from tests.official_weights import official_state_dict

SHARED_PARITY = Path(__file__).resolve().parents[1].parent / "shared" / "parity"
GOLDEN = SHARED_PARITY / "official_r50_4scale_train_golden.safetensors"
KEYS = Path(__file__).parent / "fixtures" / "parity" / "official_keys_r50_4scale.txt"
PRESET = "dino_r50_4scale"
TOLERANCE = 1e-8

pytestmark = [pytest.mark.slow,  # R50 in float64: ~55 s of CPU time
              pytest.mark.skipif(not GOLDEN.is_file(), reason=f"needs the shared parity data ({GOLDEN} is absent)")]


def digest(t: torch.Tensor) -> torch.Tensor:
    """The golden's digest: [sum, sum of squares, dot with v], v[i] = sin(0.61803398875 i + 0.5), float64."""
    flat = t.detach().double().flatten()
    v = torch.sin(0.61803398875 * torch.arange(flat.numel(), dtype=torch.float64) + 0.5)
    return torch.stack([flat.sum(), (flat * flat).sum(), flat @ v])


def relative_error(ours: torch.Tensor, official: torch.Tensor, numel: int) -> float:
    """Max error of a digest relative to its component's scale: sum of squares relative to itself; the sum and the
    dot with v (|v_i| <= 1), which cancel to ~0 for many gradients (e.g. before a LayerNorm), relative to their bound
    sqrt(numel x sum of squares) (Cauchy-Schwarz)."""
    bound = math.sqrt(numel * official[1].item())
    scale = torch.tensor([bound, official[1].item(), bound], dtype=torch.float64).clamp(min=1e-300)
    return ((ours - official).abs() / scale).max().item()


class Recorder:
    """What the loop computed at each step: loss terms (criterion output), the loss it backpropagated, pre-clip
    gradients and norm (taken where the loop clips)."""

    def __init__(self, accelerator, criterion, names: dict):
        self.losses, self.backpropagated, self.grads, self.norms = [], [], [], []
        criterion.register_forward_hook(lambda _m, _i, out: self.losses.append({k: v.item() for k, v in out.items()}))
        backward, clip = accelerator.backward, accelerator.clip_grad_norm_

        def record_backward(loss, **kwargs):
            self.backpropagated.append(loss.item())
            return backward(loss, **kwargs)

        def record_clip(parameters, max_norm, **kwargs):
            self.grads.append({names[p]: digest(p.grad) for p in names if p.grad is not None})
            norm = clip(parameters, max_norm, **kwargs)
            self.norms.append(float(norm))
            return norm

        accelerator.backward, accelerator.clip_grad_norm_ = record_backward, record_clip


@pytest.mark.golden
def test_two_official_training_steps_are_reproduced():
    golden = load_file(str(GOLDEN))
    meta = json.loads(GOLDEN.with_name(GOLDEN.name + ".json").read_text())
    cfg = load_recipe("dino_r50_4scale_12ep", [
        "train.tracker=None", "train.cpu=True", "model.backbone.pretrained=None",
        "model.denoising.enabled=True", f"model.denoising.dn_number={meta['dn_number']}",
        f"model.denoising.label_noise_ratio={meta['dn_label_noise_ratio']}",
        f"model.denoising.box_noise_scale={meta['dn_box_noise_scale']}",
    ])
    assert (cfg.optim.lr, cfg.optim.lr_backbone, cfg.optim.weight_decay, cfg.optim.clip_max_norm) == (
        meta["lr"], meta["lr_backbone"], meta["weight_decay"], meta["clip_max_norm"])
    model = dino.build_model(cfg.model)
    model.load_state_dict(convert.convert_official_state_dict(official_state_dict(KEYS), PRESET, check_aliases=False))
    model.double()
    # Our parameter -> the official canonical name its digests are stored under.
    names = {p: meta["canonical_name"][_official_name(n, cfg.model.transformer.dec_layers, False)]
             for n, p in model.named_parameters()}
    frozen = {names[p] for p in model.parameters() if not p.requires_grad}
    assert frozen == set(meta["requires_grad_false"])
    value0 = {names[p]: p.detach().clone() for p in model.parameters()}
    sizes = {k: v.numel() for k, v in value0.items()}

    accelerator = build_accelerator(cfg)
    criterion = build_criterion(cfg.model)
    assert criterion.weight_dict == meta["weight_dict"]
    optimizer = build_optimizer(model, cfg.optim)
    groups = sorted((g["lr"], g["weight_decay"], sorted(names[p] for p in g["params"])) for g in optimizer.param_groups)
    assert groups == sorted((g["lr"], g["weight_decay"], sorted(g["names"])) for g in meta["param_groups"])
    recorder = Recorder(accelerator, criterion, names)
    targets = [{"labels": golden[f"target{i}_labels"], "boxes": golden[f"target{i}_boxes"],
                "image_id": torch.tensor(i)} for i in range(2)]
    batch = (golden["images"], golden["mask"], targets)
    after_step1 = {}
    step = optimizer.step

    def step_and_record():
        step()
        if not after_step1:
            after_step1.update({names[p]: p.detach().clone() for p in model.parameters()})

    optimizer.step = step_and_record
    train_one_epoch(accelerator, model, criterion, [batch, batch], optimizer, Progress(), cfg, per_epoch=2,
                    accumulation=1)
    assert len(recorder.losses) == len(recorder.grads) == 2 and len(after_step1) == len(value0)

    errors = {}
    for s, prefix in enumerate(("", "step2.")):
        expected = {k[len(prefix + "loss."):]: v.item() for k, v in golden.items() if k.startswith(prefix + "loss.")}
        assert set(expected) == set(recorder.losses[s])
        errors[f"losses step {s + 1}"] = max(
            abs(recorder.losses[s][k] - v) / max(abs(v), 1e-12) for k, v in expected.items() if v != 0)
        assert all(recorder.losses[s][k] == 0 for k, v in expected.items() if v == 0)
        total = golden[prefix + "loss_total_weighted"].item()
        errors[f"weighted total step {s + 1}"] = abs(recorder.backpropagated[s] - total) / abs(total)
        norm = golden[prefix + "grad_norm"].item()
        errors[f"pre-clip norm step {s + 1}"] = abs(recorder.norms[s] - norm) / norm
        stored = {k[len(prefix + "grad_digest."):]: v for k, v in golden.items() if k.startswith(prefix + "grad_digest.")}
        assert set(stored) == set(recorder.grads[s])
        errors[f"grads step {s + 1}"] = max(relative_error(recorder.grads[s][k], v, sizes[k]) for k, v in stored.items())
    final = {names[p]: p.detach() for p in model.parameters()}
    for kind, values in [("value0", value0), ("delta1", {k: after_step1[k] - value0[k] for k in value0}),
                         ("delta", {k: final[k] - value0[k] for k in value0}), ("value", final)]:
        stored = {k[len(kind + "_digest."):]: v for k, v in golden.items() if k.startswith(kind + "_digest.")}
        assert set(stored) == set(values)
        # A frozen parameter's delta is exactly zero, as officially.
        zero = {k for k, v in stored.items() if not v.any()}
        assert all(not values[k].any() for k in zero), kind
        errors[kind] = max(relative_error(digest(values[k]), v, sizes[k]) for k, v in stored.items() if k not in zero)
    print("training parity, max relative error: " + ", ".join(f"{k} {v:.2g}" for k, v in errors.items()))
    bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
    assert not bad, bad
