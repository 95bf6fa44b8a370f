"""Typed configuration: plain dataclasses, no registries.

A recipe (``recipes/*.py``) builds a :class:`Recipe` from these defaults and overrides fields; the command line
can override any field with ``--set section.field=value`` (see :func:`apply_overrides`).
Defaults are the official DINO R50 4-scale values (``../shared/reference/dino_official_facts.md``).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from dino.errors import UserError

@dataclass
class BackboneConfig:
    # "resnet50" (or any torchvision resnet name) builds a torchvision ResNet with FrozenBatchNorm2d;
    # "swin_large_patch4_window12_384" builds the official DINO Swin-L backbone (dino/models/swin.py);
    # "timm:<model_name>" builds a timm model with features_only=True (e.g. "timm:resnet18").
    name: str = "resnet50"
    # Indices of the backbone stages fed to the transformer: (1, 2, 3) = C3..C5 (4-scale), (0, 1, 2, 3) = C2..C5 (5-scale).
    return_levels: tuple[int, ...] = (1, 2, 3)
    # None: random init (tests, never downloads). A file path: load that state dict (for Swin: the official
    # classification file, e.g. swin_large_patch4_window12_384_22k.pth). "torchvision" / "timm": download the
    # library's pretrained weights (needs internet; for Swin-L, timm's ImageNet-22k ".ms_in22k" weights).
    pretrained: str | None = None
    # Official: stem and layer1 frozen for ResNet; all stages train otherwise.
    freeze_stem_and_layer1: bool = True
    gradient_checkpointing: bool = False
    # Swin only: stochastic depth, rising linearly over the blocks to this rate (the official Swin default 0.2).
    drop_path_rate: float = 0.2
    # Extra keyword arguments for timm.create_model (e.g. {"img_size": 384}).
    timm_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TransformerConfig:
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.0
    num_feature_levels: int = 4
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 900
    two_stage_bbox_size: float = 0.05  # proposal w/h at level 0, doubled each level
    pe_temperature: float = 20.0


@dataclass
class DenoisingConfig:
    enabled: bool = True
    dn_number: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0  # the official configs say 0.4 but every official training script sets 1.0
    # The label embedding table has labelbook_size + 1 rows and must cover every class (>= model.num_classes).
    # None: sized to model.num_classes (official COCO: 91 = num_classes).
    labelbook_size: int | None = None


@dataclass
class MatcherConfig:
    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    focal_alpha: float = 0.25


@dataclass
class LossConfig:
    cls_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    interm_loss_coef: float = 1.0
    dn_loss_coef: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    aux_loss: bool = True


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    denoising: DenoisingConfig = field(default_factory=DenoisingConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # Labels are the dataset's category ids (as official), so num_classes = max category id + 1 (COCO: 91).
    # None: taken from the training annotations (dino.data.fit_num_classes); the presets of the official models say 91.
    num_classes: int | None = None
    num_select: int = 300  # post-processing top-k over queries x classes


@dataclass
class DataConfig:
    # "shapes": the built-in synthetic COCO-format dataset generated into `root`; "coco": a COCO-format dataset.
    dataset: str = "shapes"
    root: str = "data/shapes"
    train_images: str = "train"  # relative to root unless absolute
    train_annotations: str = "annotations/train.json"
    val_images: str = "val"
    val_annotations: str = "annotations/val.json"
    # Labels are the category ids of the annotations (COCO ids kept); the number of classes is model.num_classes.
    train_scales: tuple[int, ...] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    train_max_size: int = 1333
    crop_resize_scales: tuple[int, ...] = (400, 500, 600)
    crop_size: tuple[int, int] = (384, 600)
    val_scale: int = 800
    val_max_size: int = 1333
    num_workers: int = 2
    # Shapes generator (only for dataset="shapes").
    shapes_train_images: int = 512
    shapes_val_images: int = 64
    shapes_image_size: int = 128
    # (height, width) of the validation images, e.g. (40, 64) to measure non-square images (an exported graph's
    # fixed canvas letterboxes them); None: shapes_image_size squares, as the training images.
    shapes_val_image_size: tuple[int, int] | None = None
    shapes_seed: int = 0
    # Batches are padded to a multiple of this (1: the batch maximum, as the official code).
    size_divisibility: int = 1
    # An image that cannot be read or decoded: False stops training with one line naming it; True trains on the next
    # readable image instead, logs it and counts it in log.jsonl ("skipped_images"). `dino data check` lists them all.
    skip_unreadable: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    epochs: int = 12
    lr_drop_epochs: tuple[int, ...] = (11,)
    lr_drop_factor: float = 0.1
    # Linear LR warm-up over the first N optimizer steps, under the step schedule (official DINO: none).
    warmup_steps: int = 0
    # The official effective batch; per-device batch x processes x accumulation is made to equal it.
    total_batch_size: int = 16
    batch_size_per_device: int | None = None  # None: chosen from total_batch_size and the number of processes


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"
    seed: int = 42
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16" (accelerate's flag)
    ema: bool = False
    ema_decay: float = 0.9997
    checkpoint_every_steps: int = 500
    eval_every_epochs: int = 1
    # Images per device in evaluation (epoch-end and `dino eval`). 1, as the official evaluation: each image alone.
    # More is faster but pads every image to its batch's largest, which changes DINO's outputs and so the AP.
    eval_batch_size: int = 1
    log_every_steps: int = 20
    max_steps_per_epoch: int | None = None  # for smoke tests
    tracker: str | None = "tensorboard"  # None disables accelerate trackers
    # Stop after this many optimizer steps in total (a clean stop after the step's checkpoint; resuming continues).
    max_steps: int | None = None
    keep_checkpoints: int = 2  # the newest N (>= 1) checkpoint folders are kept
    auto_resume: bool = True  # continue from output_dir/checkpoints when present and no --resume is given
    cpu: bool = False  # force the CPU even when a GPU is present
    # Collective-op timeout: when a worker dies the others fail with an error after this long instead of hanging.
    process_group_timeout_s: int = 600
    # A step whose loss or gradient norm is NaN/inf on any process: False stops every process with one error naming
    # the step, the loss terms and the images; True skips the step on every process and counts it (log.jsonl).
    skip_nonfinite_steps: bool = False
    # DDP's per-step search for parameters without gradient; not needed by DINO (every parameter is used each step).
    find_unused_parameters: bool = False
    # Signals that end a run with a checkpoint: the current optimizer step finishes, every process saves at the same
    # step, and the process exits with status 75 (docs/training.md, "Clusters, time limits and preemption"). SIGTERM
    # is what Slurm and Kubernetes send; SIGUSR1 is what recipes/slurm_multinode.sh asks for ahead of the time limit.
    termination_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")


@dataclass
class Recipe:
    name: str = "dino_r50_4scale_12ep"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_NONE = ("none", "null")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def describe_type(tp: Any) -> str:
    """The declared type of a field in words, for error messages: ``int | None`` -> "an integer or none"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        words = " or ".join(describe_type(a) for a in rest)
        return f"{words} or none" if len(rest) < len(args) else words
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple of {_plural(args[0])} (e.g. 1,2,3)"
        return f"a tuple of {len(args)} {_plural(args[0])} (e.g. {','.join(str(i + 1) for i in range(len(args)))})"
    if origin is dict:
        return "a dict (e.g. {'img_size': 384})"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string"}.get(tp, str(tp))


def _plural(tp: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings"}.get(tp, describe_type(tp))


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return _INVALID


_INVALID = object()


def _scalar(value: Any, tp: Any) -> Any:
    """``value`` (already parsed) as ``tp`` when it is one (an int also is a float), else _INVALID."""
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    return _INVALID


def parse_typed(text: str, tp: Any) -> Any:
    """Parses an override's text as the declared type ``tp`` of its field; ValueError saying what was expected.

    Accepted: ``true/false/yes/no/on/off/1/0`` for booleans; ``none``/``null`` for an optional field; ``1,2,3``,
    ``(1,2,3)`` or ``[1,2,3]`` (a single ``3`` too) for tuples; an integer for a float field.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    value = _INVALID
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.lower() in _NONE:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return parse_typed(text, arg)
            except ValueError:
                pass
    elif tp is bool:
        value = True if text.lower() in _TRUE else False if text.lower() in _FALSE else _INVALID
    elif tp is str:
        value = text
    elif tp in (int, float):
        value = _scalar(_literal(text), tp)
        if value is _INVALID and tp is float and text.lower().lstrip("+-") in ("inf", "nan"):
            value = float(text)
    elif origin is tuple:
        parsed = _literal(text)
        if parsed is _INVALID and set(args) - {Ellipsis} == {str}:  # bare words: SIGTERM,SIGUSR1
            parsed = tuple(word.strip() for word in text.strip("()[]").split(",") if word.strip())
        value = _tuple(parsed, args)
    elif origin is dict:
        parsed = _literal(text)
        value = parsed if isinstance(parsed, dict) else _INVALID
    elif origin is typing.Literal:
        value = next((a for a in args if str(a) == text), _INVALID)
    elif tp is Any:
        parsed = _literal(text)
        value = text if parsed is _INVALID else parsed
    if value is _INVALID:
        raise ValueError(f"must be {describe_type(tp)}, got {text!r}")
    return value


def _tuple(parsed: Any, args: tuple) -> Any:
    if parsed is _INVALID:
        return _INVALID
    items = tuple(parsed) if isinstance(parsed, (list, tuple)) else (parsed,)
    variadic = len(args) == 2 and args[1] is Ellipsis
    types_ = [args[0]] * len(items) if variadic else list(args)
    if len(types_) != len(items):
        return _INVALID
    out = tuple(_scalar(item, t) for item, t in zip(items, types_))
    return _INVALID if any(v is _INVALID for v in out) else out


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Applies ``section.field=value`` overrides in place and returns ``cfg``.

    Values are checked against the field's declared type (:func:`parse_typed`) before anything runs. Raises UserError
    naming the override, the field and the expected type when the path does not exist or the value does not fit.
    """
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like section.field=value")
        path, text = item.split("=", 1)
        parts = path.strip().split(".")
        obj = cfg
        for name in parts[:-1]:
            if not dataclasses.is_dataclass(obj) or not hasattr(obj, name):
                raise UserError(f"override {item!r}: no config section {name!r}")
            obj = getattr(obj, name)
        leaf = parts[-1]
        if not dataclasses.is_dataclass(obj) or leaf not in {f.name for f in dataclasses.fields(obj)}:
            raise UserError(f"override {item!r}: no field {leaf!r} in {type(obj).__name__}")
        declared = typing.get_type_hints(type(obj))[leaf]
        try:
            value = parse_typed(text.strip(), declared)
        except ValueError as err:
            raise UserError(f"override {item!r}: {path.strip()} {err}") from None
        setattr(obj, leaf, value)
    return cfg


OVERRIDE_HELP = (
    "override recipe fields: --set optim.lr=1e-4 data.root=/data/coco model.transformer.num_queries=300 "
    "(tuples as 1,2,3 or (1,2,3); none/null for None; repeatable)"
)


def add_override_argument(parser: argparse.ArgumentParser) -> None:
    """``--set FIELD=VALUE [FIELD=VALUE ...]`` (repeatable) into ``args.overrides``: the same flag in every command."""
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                        help=OVERRIDE_HELP)
