"""Swin-L: official checkpoints convert and reproduce the official model's golden outputs in float64.

The official-named state dict is rebuilt from the key list with the golden runs' fill rule (``official_weights``),
converted like a user's ``checkpoint0011_4scale.pth``, loaded strictly into ``dino.build_model(preset)`` and run on
the golden images. Fixtures (``fixtures/parity/``): the official key lists, and the official goldens with auxiliary
and proposal outputs cut to their first 100 queries (the last layer and post-processing kept whole).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import safetensors.torch
import torch

import dino
from dino.convert import convert_official_state_dict, register
from tests.official_weights import assert_matches_golden, official_state_dict

PARITY = Path(__file__).parent / "fixtures" / "parity"


def convert_with_cli(official: dict[str, torch.Tensor], preset: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    """``dino convert-official official.pth converted.safetensors --preset PRESET``, as a user runs it."""
    pth, out = tmp_path / "official.pth", tmp_path / "converted.safetensors"
    torch.save({"model": official, "epoch": 11}, pth)
    parser = argparse.ArgumentParser(prog="dino")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert-official", str(pth), str(out), "--preset", preset])
    # The fill rule gives each per-layer copy of the shared heads its own values (real checkpoints: equal).
    with pytest.warns(UserWarning, match="per-layer copies.*differ"):
        assert args.func(args) == 0
    pth.unlink()
    return safetensors.torch.load_file(out)


@pytest.mark.slow  # about 1.5 min of CPU per preset (217M parameters in float64); CI runs it
@pytest.mark.golden
@pytest.mark.parametrize("scale", ["4scale", "5scale"])
def test_converted_official_swinl_reproduces_golden_outputs(scale, tmp_path):
    preset = f"dino_swinl_{scale}"
    official = official_state_dict(PARITY / f"official_keys_swinl_{scale}.txt")
    if scale == "4scale":
        converted = convert_with_cli(official, preset, tmp_path)
    else:
        with pytest.warns(UserWarning, match="differ"):
            converted = convert_official_state_dict(official, preset)
    del official
    model = dino.build_model(preset)
    model.load_state_dict(converted, strict=True)
    del converted
    assert_matches_golden(model, PARITY, f"golden_swinl_{scale}.safetensors")  # measured 1.7e-14 / 1.3e-13
