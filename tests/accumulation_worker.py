"""One optimizer step of a tiny detector with the real criterion through ``train_one_epoch``; prints its gradient.

Run alone (1 process, the micro-batches accumulated) or under ``accelerate launch`` (process r takes micro-batch r
of the group), it writes the all-reduced gradient the step used to ``<out>/grad.pt`` (float64). Used by
tests/test_accumulation.py.
"""
import sys

import torch
from torch import nn

from dino.criterion import SetCriterion
from dino.engine.checkpointer import Progress
from dino.engine.one_epoch import train_one_epoch
from dino.engine.recipe import load_recipe
from dino.engine.setup import build_accelerator
from dino.matcher import HungarianMatcher

NUM_QUERIES, NUM_CLASSES, SIZE = 6, 3, 8
# Boxes per image of each micro-batch (2 images each): 3 and 7 boxes, so per-micro-batch normalisation differs.
BOXES = [(1, 2), (4, 3)]


class TinyDetector(nn.Module):
    """Linear heads on the flattened image: (B, Q, C) logits and (B, Q, 4) sigmoid cxcywh boxes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.cls = nn.Linear(3 * SIZE * SIZE, NUM_QUERIES * NUM_CLASSES)
        self.box = nn.Linear(3 * SIZE * SIZE, NUM_QUERIES * 4)

    def forward(self, images, mask, targets=None):
        x = images.flatten(1)
        return {"pred_logits": self.cls(x).view(-1, NUM_QUERIES, NUM_CLASSES),
                "pred_boxes": self.box(x).view(-1, NUM_QUERIES, 4).sigmoid()}


def micro_batches() -> list[tuple]:
    g = torch.Generator().manual_seed(1)
    out = []
    for m, counts in enumerate(BOXES):
        images = torch.rand(len(counts), 3, SIZE, SIZE, generator=g, dtype=torch.float64)
        targets = []
        for i, n in enumerate(counts):
            centres = 0.3 + 0.4 * torch.rand(n, 2, generator=g, dtype=torch.float64)
            sizes = 0.1 + 0.2 * torch.rand(n, 2, generator=g, dtype=torch.float64)
            targets.append({"labels": torch.randint(NUM_CLASSES, (n,), generator=g),
                            "boxes": torch.cat([centres, sizes], 1), "image_id": torch.tensor(10 * m + i)})
        out.append((images, torch.zeros(len(counts), SIZE, SIZE, dtype=torch.bool), targets))
    return out


def step_gradient(out_dir: str) -> torch.Tensor:
    cfg = load_recipe("quickstart", ["train.tracker=None", "optim.clip_max_norm=0", "optim.warmup_steps=0",
                                     f"train.output_dir={out_dir}"])
    accelerator = build_accelerator(cfg)
    processes, rank = accelerator.num_processes, accelerator.process_index
    accumulation = len(BOXES) // processes
    batches = micro_batches()[rank * accumulation:(rank + 1) * accumulation]
    model = accelerator.prepare(TinyDetector().double())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    criterion = SetCriterion(NUM_CLASSES, HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0),
                             {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0})
    seen = []
    step = optimizer.step
    optimizer.step = lambda: seen.append(torch.cat([p.grad.flatten() for p in model.parameters()])) or step()
    train_one_epoch(accelerator, model, criterion, batches, optimizer, Progress(), cfg, per_epoch=accumulation,
                    accumulation=accumulation)
    if accelerator.is_main_process:
        torch.save(seen[0], f"{out_dir}/grad.pt")
    accelerator.wait_for_everyone()
    return seen[0]


if __name__ == "__main__":
    step_gradient(sys.argv[1])
