"""The golden parity data's weight-fill rule (shared/parity/README.md), re-implemented for the tests.

Values depend only on the official key name and the seed, so an official-named state dict can be rebuilt from the
key list alone: the converter and loss parity tests feed it to our converter and compare with the official outputs.
"""
from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch


def read_keys(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """Parses an `official_keys_*.txt` file: one `key 1x2x3` (or `key scalar`) per line."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            key, shp = line.split()
            out.append((key, () if shp == "scalar" else tuple(int(s) for s in shp.split("x"))))
    return out


def fill(key: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """The value of official key `key` under the fill rule, float64 (int64 for num_batches_tracked)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.long)
    if key.endswith("running_var"):
        return torch.rand(shape, generator=g, dtype=torch.float64) * 0.5 + 0.75
    if key.endswith("running_mean"):
        return torch.randn(shape, generator=g, dtype=torch.float64) * 0.1
    if len(shape) >= 2:
        return torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(math.prod(shape[1:]))
    if key.endswith("weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    return 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)


def official_state_dict(keys_file: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Official-named state dict as the golden run loaded it: float32 values, like an official checkpoint."""
    sd = {}
    for key, shape in read_keys(keys_file):
        value = fill(key, shape, seed)
        sd[key] = value.float() if value.is_floating_point() else value
    return sd
