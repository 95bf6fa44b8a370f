"""train_one_epoch on a toy model: accumulation-group normalisation, LR warm-up, non-finite steps (raise / skip),
matcher errors."""
import math

import pytest
import torch
from torch import nn

from dino.engine.checkpointer import Progress
from dino.engine.nonfinite import NonFiniteStepError
from dino.engine.one_epoch import accumulation_group, train_one_epoch
from dino.engine.recipe import load_recipe
from dino.engine.setup import build_accelerator
from dino.matcher import HungarianMatcher, NonFinitePredictionError


class Toy(nn.Module):
    """One weight w; prediction = w * images.sum(); the loss is the prediction itself, so d loss / d w = images.sum()."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, images, mask, targets):
        return {"pred": self.w * images.sum()}


class ToyCriterion(nn.Module):
    weight_dict = {"loss_a": 1.0, "loss_b": 2.0}

    def __init__(self, nan_at=()):
        super().__init__()
        self.calls, self.nan_at = 0, set(nan_at)

    def forward(self, outputs, targets, num_boxes=None):
        self.calls += 1
        if self.calls in self.nan_at:
            return {"loss_a": outputs["pred"], "loss_b": outputs["pred"] * math.nan}
        return {"loss_a": outputs["pred"], "loss_b": outputs["pred"] * 0}


def _batches(values):
    """One micro-batch per value v: images summing to v, one target (no boxes) with image id 10 * v."""
    return [(torch.full((1, 1), float(v)), None, [{"image_id": torch.tensor(10 * v), "labels": torch.zeros(0)}])
            for v in values]


def _run(values, accumulation, criterion, *overrides):
    cfg = load_recipe("quickstart", ["train.tracker=none", "optim.clip_max_norm=0", "optim.warmup_steps=0", *overrides])
    accelerator = build_accelerator(cfg)
    model = Toy()
    # Plain SGD with lr 1: each step moves w by exactly minus the step's gradient.
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    seen = []
    step = optimizer.step
    optimizer.step = lambda: seen.append(float(model.w.grad)) or step()
    progress = Progress()
    result = train_one_epoch(accelerator, model, criterion, _batches(values), optimizer, progress, cfg,
                             per_epoch=len(values), accumulation=accumulation)
    return seen, progress, result


def test_accumulation_groups_and_the_partial_last_group():
    assert [accumulation_group(i, 5, 2) for i in range(5)] == [(2, False), (2, True), (2, False), (2, True), (1, True)]
    assert [accumulation_group(i, 3, 4) for i in range(3)] == [(3, False), (3, False), (3, True)]
    # Gradients of micro-batches 1..5 are 1..5: groups (1,2), (3,4), (5): each step's gradient is its group's mean,
    # the partial group's too (5, not 5/2 as a fixed 1/accumulation scaling gave).
    grads, progress, result = _run([1, 2, 3, 4, 5], 2, ToyCriterion())
    assert grads == [1.5, 3.5, 5.0]
    assert (progress.global_step, progress.batches_in_epoch, result.batches) == (3, 5, 5)


@pytest.mark.parametrize("start_step", [0, 2])
def test_warmup_scales_the_first_steps_and_keeps_the_scheduled_lr(start_step):
    cfg = load_recipe("quickstart", ["train.tracker=none", "optim.clip_max_norm=0", "optim.warmup_steps=4"])
    model = Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    # Six steps of gradient 1: w moves by lr x (1/4, 2/4, 3/4, 1, 1, 1); a run resumed at step 2 goes on at 3/4.
    train_one_epoch(build_accelerator(cfg), model, ToyCriterion(), _batches([1] * 6), optimizer,
                    Progress(global_step=start_step), cfg, per_epoch=6, accumulation=1)
    factors = [min(1.0, (step + 1) / 4) for step in range(start_step, start_step + 6)]
    assert float(model.w.detach()) == pytest.approx(-sum(factors))
    assert optimizer.param_groups[0]["lr"] == 1.0  # what the epoch-stepped schedule reads next


def test_a_nonfinite_loss_stops_with_the_step_terms_and_image_ids():
    with pytest.raises(NonFiniteStepError) as err:
        _run([1, 2, 3, 4], 2, ToyCriterion(nan_at={3}))
    message = str(err.value)
    assert message.startswith("non-finite loss at step 2 (epoch 1): process 0: loss=nan, loss_b=nan (image ids [30])")
    assert "loss_a" not in message and "train.skip_nonfinite_steps=true" in message


def test_skip_nonfinite_steps_skips_the_whole_group_and_counts_it():
    grads, progress, result = _run([1, 2, 3, 4, 5, 6], 2, ToyCriterion(nan_at={3}), "train.skip_nonfinite_steps=true")
    assert grads == [1.5, 5.5]  # the group of micro-batches 3 and 4 took no step
    assert (progress.global_step, progress.skipped_steps) == (3, 1)
    # loss_a = w * v with w = 0, then -1.5 (step 1; the skipped step leaves it): the non-finite micro-batch is left out.
    assert result.means["loss_a"] == pytest.approx((0 + 0 - 1.5 * 4 - 1.5 * 5 - 1.5 * 6) / 5)


def test_a_nonfinite_gradient_norm_stops_too():
    class InfGrad(ToyCriterion):
        def forward(self, outputs, targets, num_boxes=None):
            losses = super().forward(outputs, targets)
            # A finite loss whose gradient is inf: sqrt at 0.
            return {**losses, "loss_a": losses["loss_a"] + torch.sqrt(outputs["pred"] * 0)}

    with pytest.raises(NonFiniteStepError, match=r"non-finite gradient norm at step 1 \(epoch 1\): process 0: "
                                                 r"grad_norm=(nan|inf) \(image ids \[10, 20\]\)"):
        _run([1, 2], 2, InfGrad())


def test_nan_predictions_are_reported_as_predictions():
    matcher = HungarianMatcher()
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    logits, boxes = torch.zeros(1, 3, 2), torch.full((1, 3, 4), 0.3)
    with pytest.raises(NonFinitePredictionError, match="the predictions .* hold NaN/inf"):
        matcher({"pred_logits": logits * math.nan, "pred_boxes": boxes}, targets)
    bad_targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, math.nan, 0.2]])}]
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\] hold NaN/inf") as err:
        matcher({"pred_logits": logits, "pred_boxes": boxes}, bad_targets)
    assert not isinstance(err.value, NonFinitePredictionError)

    class PredictionsFail(ToyCriterion):
        def forward(self, outputs, targets, num_boxes=None):
            self.calls += 1
            if self.calls == 2:
                raise NonFinitePredictionError("matching cost of image 0 is not finite")
            return {"loss_a": outputs["pred"], "loss_b": outputs["pred"] * 0}

    with pytest.raises(NonFiniteStepError, match=r"non-finite loss at step 1 .*process 0: predictions=nan \(image ids \[20\]\)"):
        _run([1, 2], 2, PredictionsFail())
