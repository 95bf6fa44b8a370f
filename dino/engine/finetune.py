"""Fine-tuning: start training from a full checkpoint (ours or an official ``.pth``), possibly for other classes.

The official code needs ``--pretrain_model_path ckpt.pth --finetune_ignore label_enc.weight class_embed`` to train
on a dataset with another number of classes. Here the class heads and the denoising label book are dropped by
themselves when their sizes differ from the model's; ``--ignore-keys`` drops further keys.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Iterable

import torch

from dino.errors import UserError
from dino.model_loading import read_state_dict

logger = logging.getLogger("dino.engine")

# The parameters whose shape follows the number of classes (class heads) or the label book (denoising labels).
CLASS_SIZED = re.compile(r"(^|\.)(class_embed|enc_out_class_embed|label_enc)\.")


def load_finetune_weights(model: torch.nn.Module, path: str | os.PathLike, ignore_keys: Iterable[str] = ()) -> dict:
    """Loads ``path`` into ``model`` for fine-tuning; returns ``{"loaded", "reinitialised", "unused"}`` key lists.

    Class-sized parameters whose shape differs from the model's keep their fresh initialisation; keys matching an
    ``ignore_keys`` regex are skipped. Any other shape mismatch is a UserError naming the key.
    """
    patterns = [re.compile(p) for p in ignore_keys]
    state = read_state_dict(path, getattr(model, "cfg", None))
    own = model.state_dict()
    resized = [k for k, v in state.items() if k in own and own[k].shape != v.shape and CLASS_SIZED.search(k)]
    keep = {k: v for k, v in state.items() if k not in resized and not any(p.search(k) for p in patterns)}
    for key, value in keep.items():
        if key in own and own[key].shape != value.shape:
            raise UserError(f"{path}: {key} has shape {tuple(value.shape)} but the model expects {tuple(own[key].shape)} "
                            "(skip it with --ignore-keys REGEX to fine-tune it from scratch)")
    result = model.load_state_dict(keep, strict=False)
    report = {"loaded": sorted(k for k in keep if k in own), "reinitialised": sorted(result.missing_keys),
              "unused": sorted(result.unexpected_keys)}
    if resized:
        logger.info("fine-tuning to other classes: %s of %s differ in size and start from scratch (%s)",
                    ", ".join(resized), path, _sizes(resized, state, own))
    logger.info("loaded %d tensors from %s; %d start from scratch, %d in the file are unused", len(report["loaded"]),
                path, len(report["reinitialised"]), len(report["unused"]))
    if result.missing_keys:
        logger.info("from scratch: %s", ", ".join(result.missing_keys[:20]) + (" ..." if len(result.missing_keys) > 20 else ""))
    return report


def _sizes(keys: list[str], state: dict, own: dict) -> str:
    return ", ".join(f"{k}: {tuple(state[k].shape)} -> {tuple(own[k].shape)}" for k in keys if k.endswith("weight"))
