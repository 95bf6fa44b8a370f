"""Feature backbones: torchvision ResNets with frozen BatchNorm, the official DINO Swin, or any timm ``features_only``
model."""
from __future__ import annotations

import os
import re

import torch
import torch.utils.checkpoint
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from dino.config import BackboneConfig
from dino.errors import UserError
from dino.models.swin import SWIN_VARIANTS, SwinTransformer, relative_position_index

_TIMM_PREFIX = "timm:"


def _load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise UserError(f"model.backbone.pretrained: no such file {path!r}; give an existing weights file, or "
                        "none for random weights")
    if path.endswith(".safetensors"):
        import safetensors.torch

        return safetensors.torch.load_file(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors come in many types
        raise UserError(f"model.backbone.pretrained: cannot load {path!r} as a state dict: {err}") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise UserError(f"model.backbone.pretrained: {path!r} does not hold a state dict")
    return sd


def _load_into(module: nn.Module, state_dict: dict[str, torch.Tensor], path: str) -> None:
    """Loads the keys ``module`` has; errors if none match (wrong file) or a matching key has the wrong shape."""
    own = module.state_dict()
    matched = {k: v for k, v in state_dict.items() if k in own}
    if not matched:
        raise UserError(f"model.backbone.pretrained: {path!r} shares no keys with the backbone (e.g. {next(iter(own))!r})")
    for k, v in matched.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise UserError(
                f"model.backbone.pretrained: {path!r} key {k!r} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
            )
    module.load_state_dict(matched, strict=False)


class Backbone(nn.Module):
    """Multi-level feature extractor.

    ``forward(images (B, 3, H, W))`` returns a list of NCHW feature maps, one per ``return_levels`` entry, with
    ``num_channels[i]`` channels and stride ``strides[i]``. Parameters live under ``body``.
    """

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.return_levels = tuple(cfg.return_levels)
        if not self.return_levels or any(i not in (0, 1, 2, 3) for i in self.return_levels):
            raise UserError(f"model.backbone.return_levels must be indices in 0..3, got {cfg.return_levels!r}")
        self.is_timm = cfg.name.startswith(_TIMM_PREFIX)
        self.is_swin = cfg.name in SWIN_VARIANTS
        self.gradient_checkpointing = cfg.gradient_checkpointing
        if self.is_swin:
            self._build_swin(cfg)
        elif self.is_timm:
            self._build_timm(cfg)
        else:
            self._build_torchvision(cfg)

    def _build_torchvision(self, cfg: BackboneConfig) -> None:
        if not cfg.name.startswith("resnet") or not hasattr(torchvision.models, cfg.name):
            raise UserError(f"model.backbone.name: unknown torchvision ResNet {cfg.name!r} (e.g. 'resnet50', or 'timm:NAME')")
        if cfg.pretrained == "timm":
            raise UserError(f"model.backbone.pretrained='timm' needs a timm backbone, got name {cfg.name!r}")
        # IMAGENET1K_V1: the weights the official DINO runs started from (torchvision's pretrained=True).
        weights = torchvision.models.get_model_weights(cfg.name).IMAGENET1K_V1 if cfg.pretrained == "torchvision" else None
        net = getattr(torchvision.models, cfg.name)(weights=weights, norm_layer=FrozenBatchNorm2d)
        if cfg.pretrained not in (None, "torchvision"):
            _load_into(net, _load_state_dict_file(cfg.pretrained), cfg.pretrained)
        if cfg.freeze_stem_and_layer1:
            for name, p in net.named_parameters():
                if not name.startswith(("layer2", "layer3", "layer4")):
                    p.requires_grad_(False)
        self.body = IntermediateLayerGetter(net, {f"layer{i + 1}": str(i) for i in self.return_levels})
        block_channels = [net.layer1[-1], net.layer2[-1], net.layer3[-1], net.layer4[-1]]
        # Bottleneck ends in conv3/bn3, BasicBlock in conv2/bn2: read the width from the block's last BN.
        chans = []
        for block in block_channels:
            last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
            chans.append(last_bn.weight.shape[0])
        self.num_channels = [chans[i] for i in self.return_levels]
        self.strides = [4 * 2**i for i in self.return_levels]
        self._channels_last = [False] * len(self.return_levels)

    def _build_swin(self, cfg: BackboneConfig) -> None:
        if cfg.freeze_stem_and_layer1:
            raise UserError(f"backbone.freeze_stem_and_layer1=True is for ResNets; {cfg.name!r} trains every stage "
                            "(as the official Swin backbones): set it to False")
        if cfg.pretrained == "torchvision":
            raise UserError(f"backbone.pretrained='torchvision' needs a torchvision ResNet, got {cfg.name!r}")
        self.body = SwinTransformer(SWIN_VARIANTS[cfg.name], self.return_levels, cfg.drop_path_rate,
                                    use_checkpoint=cfg.gradient_checkpointing)
        if cfg.pretrained == "timm":
            load_swin_pretrained(self.body, _fetch_timm_swin(cfg.name), f"timm {_TIMM_SWIN_TAGS[cfg.name]}")
        elif cfg.pretrained is not None:
            load_swin_pretrained(self.body, _load_state_dict_file(cfg.pretrained), cfg.pretrained)
        self.num_channels = [self.body.num_features[i] for i in self.return_levels]
        self.strides = [4 * 2**i for i in self.return_levels]
        self._channels_last = [False] * len(self.return_levels)

    def _build_timm(self, cfg: BackboneConfig) -> None:
        import timm

        name = cfg.name[len(_TIMM_PREFIX):]
        if cfg.pretrained not in (None, "timm") and not os.path.isfile(str(cfg.pretrained)):
            if cfg.pretrained == "torchvision":
                raise UserError(f"model.backbone.pretrained='torchvision' needs a torchvision ResNet, got {cfg.name!r}")
            raise UserError(f"model.backbone.pretrained: no such file {cfg.pretrained!r}; give an existing weights "
                            "file, or none for random weights")
        self.body = timm.create_model(name, pretrained=cfg.pretrained == "timm", features_only=True,
                                      out_indices=self.return_levels, **cfg.timm_kwargs)
        if cfg.pretrained not in (None, "timm"):
            _load_into(self.body, _load_state_dict_file(cfg.pretrained), cfg.pretrained)
        if cfg.gradient_checkpointing and hasattr(self.body, "set_grad_checkpointing"):
            self.body.set_grad_checkpointing(True)
        info = self.body.feature_info
        self.num_channels = list(info.channels())
        self.strides = list(info.reduction())
        # Some timm models (Swin, ...) return NHWC features; feature_info records it as output_fmt.
        fmt = getattr(self.body, "output_fmt", "NCHW")
        self._channels_last = [str(getattr(fmt, "value", fmt)).upper() == "NHWC"] * len(self.num_channels)

    def _resnet_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        # IntermediateLayerGetter's loop, with activation checkpointing of the residual stages when asked.
        checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        feats = []
        for name, module in self.body.items():
            if checkpoint and name.startswith("layer"):
                x = torch.utils.checkpoint.checkpoint(module, x, use_reentrant=False)
            else:
                x = module(x)
            if name in self.body.return_layers:
                feats.append(x)
        return feats

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        feats = self.body(images) if self.is_timm or self.is_swin else self._resnet_features(images)
        if isinstance(feats, dict):
            feats = list(feats.values())
        out = []
        for f, channels_last, c in zip(feats, self._channels_last, self.num_channels):
            if channels_last or (f.shape[1] != c and f.shape[-1] == c):
                f = f.permute(0, 3, 1, 2)
            out.append(f)
        return out


# ImageNet-22k weights the official Swin-L runs start from (swin_large_patch4_window12_384_22k.pth); timm's default
# tag for the name is the 22k->1k fine-tuned model, which is not what the official runs used.
_TIMM_SWIN_TAGS = {"swin_large_patch4_window12_384": "swin_large_patch4_window12_384.ms_in22k"}
_OFFICIAL_SWIN_FILES = {"swin_large_patch4_window12_384": "swin_large_patch4_window12_384_22k.pth"}


def _fetch_timm_swin(name: str) -> dict[str, torch.Tensor]:
    """timm's ImageNet-22k Swin weights, renamed to the official layout (timm merges patches at the START of stage
    i+1, ``layers.{i+1}.downsample``; the official code at the end of stage i, ``layers.{i}.downsample``; the
    merged-channel order is the same in both)."""
    import timm

    tag = _TIMM_SWIN_TAGS[name]
    try:
        net = timm.create_model(tag, pretrained=True)
    except Exception as err:  # network, hub and cache errors come in many types
        raise UserError(f"backbone.pretrained='timm': could not fetch {tag} ({type(err).__name__}: {err}); download "
                        f"{_OFFICIAL_SWIN_FILES[name]} and set backbone.pretrained=/path/to/it") from None
    return timm_swin_to_official(net.state_dict())


def timm_swin_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm Swin state dict -> the official Swin key layout (classification head and final norm dropped)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(("head.", "norm.")):
            continue
        out[re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)] = value
    return out


def load_swin_pretrained(body: SwinTransformer, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Loads an official-layout Swin classification state dict as the official DINO code does: classification head
    dropped, the rest non-strict (the per-stage ``norm{i}`` keep their init; the classifier's final ``norm`` and the
    stored ``attn_mask`` buffers are unused). A ``relative_position_index`` in the file must equal the computed one.
    Every other backbone parameter must be in the file, with its shape: otherwise it is the wrong file.
    """
    own = body.state_dict()
    for key, value in state_dict.items():
        if key.endswith("relative_position_index") and not torch.equal(value.cpu().long(), relative_position_index(
                body.layers[0].window)):
            raise UserError(f"backbone.pretrained: {source!r} key {key!r} is not the relative position index of a "
                            f"{body.layers[0].window}x{body.layers[0].window} window (a different Swin?)")
    matched = {k: v for k, v in state_dict.items() if k in own}  # drops head.*, norm.*, attn_mask
    for k, v in matched.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise UserError(f"backbone.pretrained: {source!r} key {k!r} has shape {tuple(v.shape)}, "
                            f"expected {tuple(own[k].shape)}")
    missing = [k for k in own if k not in matched and not re.match(r"norm\d+\.", k)]
    if missing:
        raise UserError(f"backbone.pretrained: {source!r} is not a Swin checkpoint of this size: {len(missing)} "
                        f"backbone weight(s) missing, e.g. {missing[0]!r}")
    body.load_state_dict(matched, strict=False)
