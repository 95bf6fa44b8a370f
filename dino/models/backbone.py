"""Feature backbones: torchvision ResNets with frozen BatchNorm, or any timm ``features_only`` model."""
from __future__ import annotations

import os

import torch
import torch.utils.checkpoint
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from dino.config import BackboneConfig

_TIMM_PREFIX = "timm:"


def _load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone.pretrained: no such file {path!r}")
    if path.endswith(".safetensors"):
        import safetensors.torch

        return safetensors.torch.load_file(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors come in many types
        raise ValueError(f"backbone.pretrained: cannot load {path!r} as a state dict: {err}") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"backbone.pretrained: {path!r} does not hold a state dict")
    return sd


def _load_into(module: nn.Module, state_dict: dict[str, torch.Tensor], path: str) -> None:
    """Loads the keys ``module`` has; errors if none match (wrong file) or a matching key has the wrong shape."""
    own = module.state_dict()
    matched = {k: v for k, v in state_dict.items() if k in own}
    if not matched:
        raise ValueError(f"backbone.pretrained: {path!r} shares no keys with the backbone (e.g. {next(iter(own))!r})")
    for k, v in matched.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(
                f"backbone.pretrained: {path!r} key {k!r} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
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
            raise ValueError(f"backbone.return_levels must be indices in 0..3, got {cfg.return_levels!r}")
        self.is_timm = cfg.name.startswith(_TIMM_PREFIX)
        self.gradient_checkpointing = cfg.gradient_checkpointing
        if self.is_timm:
            self._build_timm(cfg)
        else:
            self._build_torchvision(cfg)

    def _build_torchvision(self, cfg: BackboneConfig) -> None:
        if not cfg.name.startswith("resnet") or not hasattr(torchvision.models, cfg.name):
            raise ValueError(f"backbone.name: unknown torchvision ResNet {cfg.name!r} (e.g. 'resnet50', or 'timm:NAME')")
        if cfg.pretrained == "timm":
            raise ValueError(f"backbone.pretrained='timm' needs a timm backbone, got name {cfg.name!r}")
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

    def _build_timm(self, cfg: BackboneConfig) -> None:
        import timm

        name = cfg.name[len(_TIMM_PREFIX):]
        if cfg.pretrained not in (None, "timm") and not os.path.isfile(str(cfg.pretrained)):
            if cfg.pretrained == "torchvision":
                raise ValueError(f"backbone.pretrained='torchvision' needs a torchvision ResNet, got {cfg.name!r}")
            raise FileNotFoundError(f"backbone.pretrained: no such file {cfg.pretrained!r}")
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
        feats = self.body(images) if self.is_timm else self._resnet_features(images)
        if isinstance(feats, dict):
            feats = list(feats.values())
        out = []
        for f, channels_last, c in zip(feats, self._channels_last, self.num_channels):
            if channels_last or (f.shape[1] != c and f.shape[-1] == c):
                f = f.permute(0, 3, 1, 2)
            out.append(f)
        return out
