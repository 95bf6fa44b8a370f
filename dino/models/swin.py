"""Swin Transformer backbone computing what the official DINO backbone computes.

The official DINO code (IDEA-Research/DINO ``models/dino/swin_transformer.py``, the detection variant of Swin) differs
from classification Swin and from timm's Swin in ways that change the features of a detection-sized image:
- any input size: padded to a multiple of the patch size, and in every block to a multiple of the window; the window
  stays 12 and the shift 6 in every stage even when the feature map is smaller than a window (timm and classification
  Swin then shrink the window and drop the shift);
- the shifted-window mask is computed in the forward for the padded size of each stage (nothing stored);
- patch merging ends stage ``i`` (state-dict name ``layers.{i}.downsample``), and stage ``i``'s output is taken before
  it, through one extra LayerNorm ``norm{i}`` per returned stage.
That is why this module is written here instead of wrapping timm's Swin blocks. Parameter names are the official ones
(``patch_embed.*``, ``layers.{i}.blocks.{j}.*``, ``layers.{i}.downsample.*``, ``norm{i}.*``), so the official DINO
checkpoints and the ImageNet-22k file ``swin_large_patch4_window12_384_22k.pth`` load by name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp
from torch import nn


@dataclass(frozen=True)
class SwinSpec:
    """Architecture of one Swin variant."""

    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    patch_size: int = 4
    mlp_ratio: float = 4.0


# The official backbone name "swin_L_384_22k" is this architecture; its name here is the checkpoint's model name.
SWIN_VARIANTS: dict[str, SwinSpec] = {
    "swin_large_patch4_window12_384": SwinSpec(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48),
                                               window_size=12),
}


def relative_position_index(window: int) -> torch.Tensor:
    """(window², window²) int64: the relative-position bias table row of each pair of positions in a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of ``window`` -> (B * nW, window * window, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, window * window, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shifted_window_mask(hp: int, wp: int, window: int, shift: int, device: torch.device,
                        dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask (nW, window², window²) of the shifted windows of a (hp, wp) padded map.

    After the cyclic shift, the last window row/column mixes three regions of the map ([0, hp - window),
    [hp - window, hp - shift), [hp - shift, hp) along each axis); positions in different regions must not attend to
    each other: -100 there (as the official code, not -inf), 0 elsewhere.
    """
    def region(n: int) -> torch.Tensor:
        i = torch.arange(n, device=device)
        return (i >= n - window).long() + (i >= n - shift).long()

    labels = (region(hp)[:, None] * 3 + region(wp)[None, :]).to(dtype)
    windows = window_partition(labels[None, :, :, None], window).squeeze(-1)  # (nW, window²)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative-position bias."""

    def __init__(self, dim: int, window: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        # A function of the window size only: computed, never loaded (the converter checks a checkpoint's copy).
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B * nW, N, C) windows of N = window² tokens; mask: (nW, N, N) additive or None."""
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B * nW, heads, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1)[None]
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]).view(-1, self.num_heads, n, n)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj(x)


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP, both residual with stochastic depth."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, h: int, w: int, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, h * w, C); mask: the stage's shifted-window mask (used by shifted blocks only)."""
        b, _, c = x.shape
        shortcut = x
        # Normalise first, then zero-pad to whole windows (the padding is zeros, not normalised zeros).
        x = self.norm1(x).view(b, h, w, c)
        pad_b, pad_r = (-h) % self.window, (-w) % self.window
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        x = self.attn(window_partition(x, self.window), mask if self.shift else None)
        x = window_reverse(x, self.window, hp, wp)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x[:, :h, :w].reshape(b, h * w, c)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token: (B, h * w, C) -> (B, ceil(h/2) * ceil(w/2), 2C); odd sizes are zero-padded."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c = x.shape
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
        # Channel order (row, col) offsets (0,0), (1,0), (0,1), (1,1): the order the official weights expect.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """``depth`` blocks alternating plain and shifted windows, then (except the last stage) patch merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float,
                 drop_path: list[float], downsample: bool):
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if j % 2 == 0 else window // 2, mlp_ratio, drop_path[j])
            for j in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None
        self.use_checkpoint = False

    def forward(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, h * w, C) -> (stage output (B, h * w, C), downsampled (B, ceil(h/2) * ceil(w/2), 2C) or None)."""
        hp, wp = -(-h // self.window) * self.window, -(-w // self.window) * self.window
        mask = shifted_window_mask(hp, wp, self.window, self.window // 2, x.device, x.dtype)
        checkpoint = self.use_checkpoint and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            if checkpoint:
                x = torch.utils.checkpoint.checkpoint(blk, x, h, w, mask, use_reentrant=False)
            else:
                x = blk(x, h, w, mask)
        return x, (self.downsample(x, h, w) if self.downsample is not None else None)


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch convolution + LayerNorm; the image is zero-padded right/bottom to whole patches."""

    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(B, 3, H, W) -> ((B, h * w, C), h, w) with h = ceil(H / patch), w = ceil(W / patch)."""
        x = F.pad(images, (0, (-images.shape[-1]) % self.patch, 0, (-images.shape[-2]) % self.patch))
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class SwinTransformer(nn.Module):
    """Swin backbone returning the LayerNorm-ed outputs of stages ``out_indices``.

    ``forward(images (B, 3, H, W))`` -> list of (B, embed_dim * 2**i, ceil(H / 2**(i+2)), ceil(W / 2**(i+2))) for i in
    ``out_indices`` (strides 4, 8, 16, 32). Stochastic depth rises linearly from 0 to ``drop_path_rate`` over all
    blocks; ``use_checkpoint`` recomputes each block's activations in the backward (training only).
    """

    def __init__(self, spec: SwinSpec, out_indices: tuple[int, ...], drop_path_rate: float = 0.2,
                 use_checkpoint: bool = False):
        super().__init__()
        self.out_indices = tuple(out_indices)
        num_stages = len(spec.depths)
        self.num_features = [spec.embed_dim * 2**i for i in range(num_stages)]
        self.patch_embed = PatchEmbed(spec.patch_size, spec.embed_dim)
        dpr = torch.linspace(0, drop_path_rate, sum(spec.depths), device="cpu").tolist()  # float32, as official
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            first = sum(spec.depths[:i])
            self.layers.append(SwinStage(self.num_features[i], spec.depths[i], spec.num_heads[i], spec.window_size,
                                         spec.mlp_ratio, dpr[first:first + spec.depths[i]],
                                         downsample=i < num_stages - 1))
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.set_grad_checkpointing(use_checkpoint)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.use_checkpoint = enable

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x, h, w = self.patch_embed(images)
        outs = []
        for i, stage in enumerate(self.layers):
            out, x_down = stage(x, h, w)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
                outs.append(out.view(-1, h, w, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
            if x_down is None:
                break
            x, h, w = x_down, (h + 1) // 2, (w + 1) // 2
        return outs
