"""Imports the official IDEA-Research/DINO code from a local checkout, for scripts/official_peer.py only.

Nothing of the official code is copied here or built: the checkout (``$DINO_OFFICIAL_ROOT``, e.g. the git-ignored
``.official-dino/``) is put on ``sys.path`` and its modules are imported as they are, with these stand-ins, all made
from this file at import time:

- ``MultiScaleDeformableAttention``: the official compiled op, imported by ``models/dino/ops/functions`` at import
  time. Never built here; a stand-in module in ``sys.modules`` routes its two functions to the deformable-attention
  implementation chosen with :func:`route` (this project's re-creation of the original kernel, csrc/bench/, or the
  official ``ms_deform_attn_core_pytorch``).
- ``timm.models.layers`` (only when timm is not installed, e.g. on a bare GPU machine): imported by the official
  Swin and ConvNeXt backbone modules at import time, used only when building those; R50 does not. The stub's
  ``DropPath`` / ``to_2tuple`` / ``trunc_normal_`` raise if called.
- ``addict`` / ``yapf`` / ``termcolor`` / ``matplotlib``: imported only by the official config, logging and
  visualisation helpers, which this file does not import; the config file is read with ``runpy`` instead of
  ``SLConfig``, so no stub is needed for them. (``timm``, ``scipy``, ``pycocotools`` are in the project's venv.)
- ``backbone.is_main_process``: the official ResNet asks torchvision for ImageNet weights when it is true (a
  download); replaced by ``False`` (random init; weights are set by the caller).
- On the CPU (dry runs): the official training code calls ``.cuda()`` / ``.to('cuda')`` directly
  (``dn_components.py``, ``dino.py``); :func:`cuda_calls_to` maps those to the given device for the duration of a
  call.

Needs torch, torchvision and scipy (the project's venv or the GPU machine's python).
"""
from __future__ import annotations

import argparse
import contextlib
import runpy
import subprocess
import sys
import types
from pathlib import Path

import torch

ROUTES = {
    "original": "official code, original kernel design (csrc/bench re-creation, fp32)",
    "pytorch": "official code, PyTorch path (ms_deform_attn_core_pytorch)",
}
_state = {"route": "pytorch", "baseline": None}


def route(name: str, baseline=None) -> None:
    """Which implementation the official ``MSDeformAttnFunction`` runs from now on.

    ``original``: ``baseline.baseline_forward`` / ``baseline_backward`` (``dino.ops.bench.load_baseline()`` on a GPU;
    a CPU stand-in with the same functions in dry runs). ``pytorch``: the official ``ms_deform_attn_core_pytorch``
    (forward through autograd; the official op's backward is then autograd's)."""
    if name not in ROUTES:
        raise ValueError(f"unknown deformable-attention route {name!r}; choose from {', '.join(ROUTES)}")
    if name == "original" and baseline is None:
        raise ValueError("route 'original' needs the baseline extension")
    _state["route"], _state["baseline"] = name, baseline


def _forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step):
    return _state["baseline"].baseline_forward(value, spatial_shapes, level_start_index, sampling_locations,
                                               attention_weights)


def _backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output,
              im2col_step):
    return tuple(_state["baseline"].baseline_backward(grad_output, value, spatial_shapes, level_start_index,
                                                      sampling_locations, attention_weights))


class _Routed:
    """Takes the place of the official ``MSDeformAttnFunction`` in ``models.dino.ops.modules.ms_deform_attn``."""

    def __init__(self, function, core_pytorch):
        self.function, self.core_pytorch = function, core_pytorch

    def apply(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step):
        if _state["route"] == "pytorch":
            return self.core_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
        return self.function.apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                   im2col_step)


class CpuBaseline:
    """Dry runs only: the baseline extension's two functions from the project's PyTorch path, so the ``original``
    route's plumbing (argument order, backward) runs on a CPU."""

    @staticmethod
    def baseline_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        from dino.ops.ms_deform_attn import ms_deform_attn_pytorch

        return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

    @staticmethod
    def baseline_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                          attention_weights):
        from dino.ops.custom_op import ms_deform_attn_backward_pytorch

        return ms_deform_attn_backward_pytorch(grad_output, value, spatial_shapes, level_start_index,
                                               sampling_locations, attention_weights)


def load(root: Path) -> types.SimpleNamespace:
    """Imports the official model code from the checkout ``root``; returns its build function, ``NestedTensor``,
    ``get_param_dict`` and the commit (``git describe`` of the checkout, else ``unknown``)."""
    root = Path(root).resolve()
    if not (root / "models" / "dino" / "dino.py").is_file():
        raise FileNotFoundError(f"{root} is not an IDEA-Research/DINO checkout (no models/dino/dino.py)")
    stand_in = types.ModuleType("MultiScaleDeformableAttention")
    stand_in.__doc__ = "stand-in for the official compiled op (scripts/official_code.py); never built here"
    stand_in.ms_deform_attn_forward, stand_in.ms_deform_attn_backward = _forward, _backward
    sys.modules["MultiScaleDeformableAttention"] = stand_in
    _stub_timm_if_missing()
    sys.path.insert(0, str(root))
    from models.dino import backbone as official_backbone
    from models.dino.ops.functions import ms_deform_attn_func
    from models.dino.ops.modules import ms_deform_attn as official_msda
    from models.registry import MODULE_BUILD_FUNCS
    from util.get_param_dicts import get_param_dict
    from util.misc import NestedTensor

    official_backbone.is_main_process = lambda: False  # no ImageNet download; weights come from the caller
    official_msda.MSDeformAttnFunction = _Routed(ms_deform_attn_func.MSDeformAttnFunction,
                                                 ms_deform_attn_func.ms_deform_attn_core_pytorch)
    return types.SimpleNamespace(build=MODULE_BUILD_FUNCS.get("dino"), NestedTensor=NestedTensor,
                                 get_param_dict=get_param_dict, commit=_commit(root), root=root)


def _stub_timm_if_missing() -> None:
    try:
        import timm.models.layers  # noqa: F401 - the real one when installed
        return
    except ImportError:
        pass

    def unavailable(*args, **kwargs):
        raise RuntimeError("timm is not installed: the official Swin / ConvNeXt backbones need it (R50 does not)")

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = layers.to_2tuple = layers.trunc_normal_ = unavailable
    timm, models = types.ModuleType("timm"), types.ModuleType("timm.models")
    timm.models, models.layers = models, layers
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})


def _commit(root: Path) -> str:
    marker = root / "COMMIT"  # written by whoever extracted a work tree from a bare mirror (git archive)
    if marker.is_file():
        return marker.read_text().strip()[:12]
    if not (root / ".git").exists():  # git -C would report the enclosing repository's commit
        return "unknown"
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def official_args(root: Path, cfg, backbone: str, device: str) -> argparse.Namespace:
    """The official ``config/DINO/DINO_4scale.py`` (read with runpy, over its ``_base_``) with the overrides of the
    official training script ``scripts/DINO_train.sh`` (dn_box_noise_scale 1.0 etc.), then sized like our ``cfg``
    (a ``dino.config.ModelConfig``: layers, widths, queries, denoising, classes), on ``device``."""
    config = Path(root) / "config" / "DINO" / "DINO_4scale.py"
    values: dict = {}
    for base in runpy.run_path(str(config)).get("_base_", []):
        values.update(runpy.run_path(str(config.parent / base)))
    values.update(runpy.run_path(str(config)))
    values = {k: v for k, v in values.items() if not k.startswith("__")}
    t, dn = cfg.transformer, cfg.denoising
    values.update(
        # main.py's command-line defaults that the model build reads
        dataset_file="coco", device=device, frozen_weights=None, masks=False,
        # scripts/DINO_train.sh --options
        dn_scalar=100, embed_init_tgt=True, dn_label_coef=1.0, dn_bbox_coef=1.0, use_ema=False,
        dn_box_noise_scale=dn.box_noise_scale,
        # sized like ours
        backbone=backbone, hidden_dim=t.hidden_dim, nheads=t.nheads, enc_layers=t.enc_layers,
        dec_layers=t.dec_layers, dim_feedforward=t.dim_feedforward, num_queries=t.num_queries,
        num_feature_levels=t.num_feature_levels, enc_n_points=t.enc_n_points, dec_n_points=t.dec_n_points,
        use_dn=dn.enabled, dn_number=dn.dn_number, dn_label_noise_ratio=dn.label_noise_ratio,
        num_classes=cfg.num_classes, dn_labelbook_size=dn.labelbook_size or cfg.num_classes,
        num_select=cfg.num_select, return_interm_indices=list(cfg.backbone.return_levels),
    )
    return argparse.Namespace(**values)


@contextlib.contextmanager
def cuda_calls_to(device: torch.device):
    """Maps ``tensor.cuda()`` and ``tensor.to('cuda')`` to ``device`` while active (the official training code's
    hard-coded CUDA calls, for dry runs on a CPU). No-op when ``device`` is a CUDA device."""
    if device.type == "cuda":
        yield
        return
    original_cuda, original_to = torch.Tensor.cuda, torch.Tensor.to

    def is_cuda(arg) -> bool:
        return (isinstance(arg, str) and arg.startswith("cuda")) or (
            isinstance(arg, torch.device) and arg.type == "cuda")

    def to(self, *args, **kwargs):
        if args and is_cuda(args[0]):
            args = (device, *args[1:])
        if is_cuda(kwargs.get("device")):
            kwargs["device"] = device
        return original_to(self, *args, **kwargs)

    torch.Tensor.cuda = lambda self, *args, **kwargs: original_to(self, device)
    torch.Tensor.to = to
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.to = original_cuda, original_to
