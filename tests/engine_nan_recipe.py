"""The tiny engine recipe, but process 1 (RANK=1) gets a NaN box loss in its second training step.

Used by the two-process test of non-finite losses: loading this recipe in each process patches the criterion of
process 1 only, as a diverging model would on one GPU.
"""
import math
import os

from engine_tiny_recipe import recipe as tiny_recipe

from dino.criterion import SetCriterion


def _poison_second_call() -> None:
    forward = SetCriterion.forward
    calls = [0]

    def poisoned(self, outputs, targets, num_boxes=None):
        losses = forward(self, outputs, targets, num_boxes)
        if self.training:
            calls[0] += 1
            if calls[0] == 2:
                losses["loss_bbox"] = losses["loss_bbox"] * math.nan
        return losses

    SetCriterion.forward = poisoned


def recipe():
    if os.environ.get("RANK") == "1":
        _poison_second_call()
    return tiny_recipe()
