"""The golden parity data's weight-fill rule (shared/parity/README.md), re-implemented for the tests.

Values depend only on the official key name and the seed, so an official-named state dict can be rebuilt from the
key list alone: the converter and loss parity tests feed it to our converter and compare with the official outputs.
"""
from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file


def read_keys(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """Parses an `official_keys_*.txt` file: one `key 1x2x3` (or `key scalar`) per line."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            key, shp = line.split()
            out.append((key, () if shp == "scalar" else tuple(int(s) for s in shp.split("x"))))
    return out


def swin_relative_position_index(window: int) -> torch.Tensor:
    """The Swin buffer for a square window, written from its definition (not dino's code): for positions p, q of a
    window in row-major order, (row_p - row_q + w - 1) * (2w - 1) + (col_p - col_q + w - 1)."""
    pos = torch.arange(window * window)
    row, col = pos // window, pos % window
    return (row[:, None] - row[None, :] + window - 1) * (2 * window - 1) + (col[:, None] - col[None, :] + window - 1)


def fill(key: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """The value of official key `key` under the fill rule, float64 (int64 for num_batches_tracked and the Swin
    relative_position_index, which gets its true value as in every real checkpoint)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    if key.endswith("relative_position_index"):
        return swin_relative_position_index(math.isqrt(shape[0]))
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


def golden_batch(parity: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The golden runs' two images (``parity/images.safetensors``) zero-padded into one (2, 3, 320, 480) float64
    batch, and its (2, 320, 480) padding mask (True on padding)."""
    stored = load_file(parity / "images.safetensors")
    images = torch.zeros(2, 3, 320, 480, dtype=torch.float64)
    mask = torch.ones(2, 320, 480, dtype=torch.bool)
    for b in range(2):
        img = stored[f"image{b}"]
        images[b, :, : img.shape[1], : img.shape[2]] = img
        mask[b, : img.shape[1], : img.shape[2]] = False
    return images, mask


def output_errors(out: dict, golden: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max abs difference of every compared output: last layer, each auxiliary decoder layer, encoder proposals.
    Auxiliary and proposal goldens may keep only the first queries (fixture size): compared on those."""
    def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
        assert a.shape == b.shape, (a.shape, b.shape)
        return (a - b).abs().max().item()

    nq = golden["aux0_logits"].shape[1]
    errors = {"pred_logits": max_abs(out["pred_logits"], golden["pred_logits"]),
              "pred_boxes": max_abs(out["pred_boxes"], golden["pred_boxes"])}
    for i, aux in enumerate(out["aux_outputs"]):
        errors[f"aux{i}_logits"] = max_abs(aux["pred_logits"][:, :nq], golden[f"aux{i}_logits"])
        errors[f"aux{i}_boxes"] = max_abs(aux["pred_boxes"][:, :nq], golden[f"aux{i}_boxes"])
    errors["interm_logits"] = max_abs(out["interm_outputs"]["pred_logits"][:, :nq], golden["interm_logits"])
    errors["interm_boxes"] = max_abs(out["interm_outputs"]["pred_boxes"][:, :nq], golden["interm_boxes"])
    return errors


def assert_matches_golden(model: torch.nn.Module, parity: Path, golden_file: str) -> dict[str, float]:
    """Runs float64 ``model`` on the golden batch and asserts the official outputs: every compared output within
    1e-10 (measured 1.5e-14 to 1.3e-13 on CPU: room for other BLAS summation orders only, so a conversion slip such
    as a missing norm or a swapped head copy cannot hide under it) and identical post-processed top-300 labels.
    Returns the errors."""
    from dino.postprocess import postprocess

    images, mask = golden_batch(parity)
    with torch.inference_mode():
        out = model.double().eval()(images, mask)
    golden = load_file(parity / golden_file)
    assert len(out["aux_outputs"]) == 5
    errors = output_errors(out, golden)
    print(f"{golden_file} parity max abs errors: {max(errors.values()):.3g}", errors)
    assert max(errors.values()) <= 1e-10, errors
    sizes = torch.tensor([[320, 480], [288, 384]])
    scores, labels, boxes = postprocess(out["pred_logits"], out["pred_boxes"], sizes, 300)
    for b in range(2):
        assert torch.equal(labels[b], golden[f"post{b}_labels"])
        # Post-processing of the golden outputs is exact; ours differs only by the errors above (sigmoid slope <= 1/4;
        # boxes scaled by <= 480 px).
        assert (scores[b] - golden[f"post{b}_scores"]).abs().max() <= 1e-10
        assert (boxes[b] - golden[f"post{b}_boxes"]).abs().max() <= 1e-8  # pixels
    return errors
