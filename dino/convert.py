"""Official IDEA-Research/DINO checkpoint -> this project's safetensors state dict.

Every official key either maps to one of our keys or is on an explicit "dropped" list (the per-layer copies of the
shared heads; Swin's ``relative_position_index`` buffers, after checking them against the computed index); anything
else (a key missing, unexpected, or of the wrong shape) is an error naming the key. CLI: ``dino convert-official``.
"""
from __future__ import annotations

import argparse
import os
import re
import warnings

import torch

from dino.config import ModelConfig
from dino.durable import check_output_file
from dino.errors import UserError
from dino.models.swin import SWIN_VARIANTS, relative_position_index
from dino.weights import load_pth_state_dict, save_weights

# The official model shares one class head and one box head across decoder layers but lists them under many
# keys: ``class_embed.{i}``, ``transformer.decoder.class_embed.{i}`` (same for bbox_embed). Loading such a state
# dict into the official model, the value under the LAST key its load_state_dict visits wins: the top-level
# ``class_embed.{L-1}`` / ``bbox_embed.{L-1}`` (checked against the official golden outputs). We take that key
# and drop the other aliases.
_ALIAS = re.compile(r"^(?:transformer\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.+)$")
# The official backbone lives under ``backbone.0.``: a ResNet under ``backbone.0.body.`` (IntermediateLayerGetter), a
# Swin directly (``backbone.0.patch_embed.*``, ``backbone.0.layers.{i}.*``, ``backbone.0.norm{i}.*``). Ours: under
# ``backbone.body.`` with the same names below it.
_BACKBONE = "backbone.0."
_RESNET = "backbone.0.body."
# Keys a checkpoint may carry that our model has no use for (FrozenBatchNorm2d has no batch counter).
_DROPPED = re.compile(r"^backbone\.0\.body\..*num_batches_tracked$")
# Swin buffer, a function of the window size: checked against the computed index, then dropped (ours is computed).
_REL_INDEX = re.compile(r"^backbone\.0\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index$")


def _our_backbone_name(official: str) -> str:
    prefix = _RESNET if official.startswith(_RESNET) else _BACKBONE
    return "backbone.body." + official[len(prefix):]


def _official_name(ours: str, num_dec: int, is_swin: bool) -> str:
    """Our key -> the official key we read it from."""
    head, _, rest = ours.partition(".")
    if head in ("class_embed", "bbox_embed"):
        return f"{head}.{num_dec - 1}.{rest}"
    if ours.startswith("backbone.body."):
        return (_BACKBONE if is_swin else _RESNET) + ours[len("backbone.body."):]
    return ours


def _check_relative_position_index(key: str, value: torch.Tensor, window: int) -> None:
    expected = relative_position_index(window)
    if tuple(value.shape) != tuple(expected.shape) or value.is_floating_point() or not torch.equal(
            value.to("cpu", torch.long), expected):
        raise UserError(f"official key {key!r} is not the relative position index of a {window}x{window} window "
                        f"(shape {tuple(value.shape)}, expected {tuple(expected.shape)}; checkpoint damaged or for "
                        "another Swin?)")


def _expected_state_dict(cfg: ModelConfig) -> dict[str, torch.Size]:
    from dino.models.dino import DINO

    # Meta device: shapes only, no memory, no init cost.
    with torch.device("meta"):
        model = DINO(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def _resolve_preset(preset: str | ModelConfig) -> tuple[str, ModelConfig]:
    if isinstance(preset, ModelConfig):
        return "custom", preset
    from dino.presets import get_preset

    return preset, get_preset(preset)


def convert_official_state_dict(official_sd: dict[str, torch.Tensor], preset: str | ModelConfig,
                                check_aliases: bool = True) -> dict[str, torch.Tensor]:
    """Maps an official DINO state dict (``checkpoint['model']``) to ours.

    Args:
        official_sd: official key -> tensor (any ``module.`` prefix from DDP is stripped).
        preset: preset name or ModelConfig of the target model (gives expected keys and shapes).
        check_aliases: warn (naming the keys) when the official per-layer copies of a shared head differ; they
            are equal in real checkpoints.
    Returns:
        our key -> tensor (same tensors, no copies), loadable with ``load_state_dict(..., strict=True)``.
    Raises:
        ValueError naming the key(s) when a key is missing or unexpected or a shape differs, or a Swin
        ``relative_position_index`` is not the computed one.
    """
    _, cfg = _resolve_preset(preset)
    expected = _expected_state_dict(cfg)
    num_dec = cfg.transformer.dec_layers
    swin = SWIN_VARIANTS.get(cfg.backbone.name)
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in official_sd.items()}
    if not any(k.startswith(("transformer.", _BACKBONE)) for k in sd):
        raise ValueError("not a DINO checkpoint: no 'transformer.*' or 'backbone.0.*' keys "
                         f"(first keys: {list(sd)[:3]})")

    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    aliases: dict[str, list[str]] = {}
    unexpected = []
    for key, value in sd.items():
        m = _ALIAS.match(key)
        if m:
            head, layer, rest = m.group(1), int(m.group(2)), m.group(3)
            if layer >= num_dec:
                unexpected.append(key)
                continue
            ours = f"{head}.{rest}"
            aliases.setdefault(ours, []).append(key)
            if key == f"{head}.{num_dec - 1}.{rest}":
                out[ours], source[ours] = value, key
            continue
        if _DROPPED.match(key):
            continue
        if swin is not None and _REL_INDEX.match(key):
            _check_relative_position_index(key, value, swin.window_size)
            continue
        ours = _our_backbone_name(key) if key.startswith(_BACKBONE) else key
        if ours not in expected:
            unexpected.append(key)
            continue
        out[ours], source[ours] = value, key
    if unexpected:
        raise ValueError(f"unexpected key(s) in the official checkpoint for this preset: {', '.join(unexpected[:10])}"
                         + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
    missing = [k for k in expected if k not in out]
    if missing:
        official_names = [_official_name(k, num_dec, swin is not None) for k in missing]
        raise ValueError(f"missing key(s) in the official checkpoint: {', '.join(official_names[:10])}"
                         + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    for k, shape in expected.items():
        if tuple(out[k].shape) != tuple(shape):
            raise ValueError(f"shape mismatch for official key {source[k]!r}: checkpoint {tuple(out[k].shape)}, "
                             f"model {tuple(shape)} (is --preset right?)")
    if check_aliases:
        differing = [f"{k} != {source[ours]}" for ours, keys in aliases.items() for k in keys
                     if k != source[ours] and not torch.equal(sd[k], out[ours])]
        if differing:
            warnings.warn(f"{len(differing)} per-layer copies of the shared heads differ from the kept key "
                          f"(real checkpoints have them equal): {'; '.join(differing[:4])}"
                          + (" ..." if len(differing) > 4 else ""), stacklevel=2)
    return out


def convert_official_checkpoint(in_path: str, out_path: str, preset: str = "dino_r50_4scale",
                                trust_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """Loads an official ``.pth``, converts it for ``preset`` and writes ``out_path`` (safetensors) atomically."""
    name, _ = _resolve_preset(preset)
    sd = convert_official_state_dict(load_pth_state_dict(in_path, trust_checkpoint), preset)
    save_weights(sd, out_path, {"format": "pt", "preset": name, "source": os.path.basename(in_path)})
    return sd


def _run(args: argparse.Namespace) -> int:
    # Before a long load; replacing only an older .safetensors (never a .pth, an image or another file).
    check_output_file(args.output, "output", "model.safetensors", inputs=(args.input,), replaces=(".safetensors",))
    try:
        sd = convert_official_checkpoint(args.input, args.output, args.preset, args.trust_checkpoint)
    except UserError:
        raise
    except ValueError as err:  # the converter's key and shape checks: the file is not this preset's checkpoint
        raise UserError(f"{args.input}: {err}") from None
    print(f"wrote {len(sd)} tensors ({sum(v.numel() for v in sd.values()):,} values) for preset "
          f"{args.preset} to {args.output}")
    return 0


def register(subparsers) -> None:
    """Adds the ``convert-official`` subcommand."""
    p = subparsers.add_parser(
        "convert-official",
        help="convert an official IDEA-Research/DINO checkpoint (.pth) to safetensors",
        description="Convert an official IDEA-Research/DINO checkpoint (e.g. checkpoint0011_4scale.pth) to a "
                    "safetensors state dict that loads strictly into `dino.build_model(PRESET)` (R50 and Swin-L, "
                    "4- and 5-scale). Every official key is mapped or deliberately dropped (the per-layer copies of "
                    "the shared heads; Swin's relative_position_index buffers, once checked); a missing or "
                    "unexpected key or a wrong shape is an error naming the key.",
    )
    p.add_argument("input", help="official checkpoint (.pth): {'model': state_dict, ...} or a bare state dict")
    p.add_argument("output", help="output .safetensors path (written atomically)")
    from dino.presets import PRESETS

    p.add_argument("--preset", default="dino_r50_4scale", choices=sorted(PRESETS),
                   help="model preset the checkpoint belongs to (default: dino_r50_4scale)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load with torch.load(weights_only=False): only for files you trust")
    p.set_defaults(func=_run)
