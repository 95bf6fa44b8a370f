"""Fitting the model's class count to a dataset: ``model.num_classes`` from the annotations, and a label book that
holds every class.

Labels are category ids (COCO ids kept), so a dataset needs ``num_classes = max category id + 1``
(:func:`dino.data.read_categories`, or ``CocoDetection.num_classes``). A recipe leaves ``model.num_classes`` and
``model.denoising.labelbook_size`` at None to take them from the dataset; values it sets are checked instead.
"""
from __future__ import annotations

import logging

from dino.config import ModelConfig
from dino.errors import UserError

__all__ = ["fit_num_classes"]

logger = logging.getLogger("dino.data")


def fit_num_classes(model_cfg: ModelConfig, num_classes: int, source: str = "the dataset") -> ModelConfig:
    """Sets ``model_cfg.num_classes`` (when None) to the dataset's ``num_classes`` and ``denoising.labelbook_size``
    (when None) to the model's ``num_classes``, in place; returns ``model_cfg``.

    Raises UserError, naming both numbers and the one setting to change, when the recipe set ``model.num_classes``
    below the dataset's (its labels would not fit the head) or ``model.denoising.labelbook_size`` below
    ``model.num_classes`` (denoising would index past the label embedding). ``source`` (e.g. the annotations file)
    is named in the messages. A head larger than the dataset needs is allowed (an official 91-class model on a
    subset of COCO) but logged, since it is usually an unintended recipe default.
    """
    if model_cfg.num_classes is None:
        model_cfg.num_classes = num_classes
    elif model_cfg.num_classes < num_classes:
        raise UserError(
            f"model.num_classes={model_cfg.num_classes} is smaller than the {num_classes} classes of {source} "
            f"(labels are category ids: max id {num_classes - 1} + 1); set model.num_classes={num_classes} "
            "(or leave it unset, None, to take it from the dataset)"
        )
    elif model_cfg.num_classes > num_classes:
        logger.warning(
            "model.num_classes=%d is set by the recipe; %s needs only %d (max category id + 1); "
            "set model.num_classes=None to size the head to the dataset", model_cfg.num_classes, source, num_classes,
        )
    book = model_cfg.denoising.labelbook_size
    if book is None:
        model_cfg.denoising.labelbook_size = model_cfg.num_classes
    elif book < model_cfg.num_classes:
        raise UserError(
            f"model.denoising.labelbook_size={book} is smaller than model.num_classes={model_cfg.num_classes}: "
            f"the denoising label book must hold every class; set model.denoising.labelbook_size="
            f"{model_cfg.num_classes} (or leave it unset, None, to size it to num_classes)"
        )
    return model_cfg
