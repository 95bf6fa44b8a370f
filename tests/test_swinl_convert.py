"""Converter on official Swin-L key lists: every key mapped, the relative-position buffer checked, errors named."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dino.convert import convert_official_state_dict
from dino.errors import UserError
from tests.official_weights import read_keys, swin_relative_position_index

PARITY = Path(__file__).parent / "fixtures" / "parity"
REL_INDEX = "backbone.0.layers.2.blocks.5.attn.relative_position_index"


def official_keys(name: str) -> dict[str, torch.Tensor]:
    """Right keys and shapes, no memory (meta), except the small relative_position_index buffers: true values."""
    return {k: swin_relative_position_index(12) if k.endswith("relative_position_index")
            else torch.empty(s, device="meta") for k, s in read_keys(PARITY / f"official_keys_{name}.txt")}


@pytest.mark.parametrize("scale", ["4scale", "5scale"])
def test_every_official_swinl_key_is_mapped(scale):
    sd = official_keys(f"swinl_{scale}")
    out = convert_official_state_dict(sd, f"dino_swinl_{scale}", check_aliases=False)
    assert out["backbone.body.layers.2.blocks.17.mlp.fc2.bias"] is sd["backbone.0.layers.2.blocks.17.mlp.fc2.bias"]
    assert out["backbone.body.norm3.weight"] is sd["backbone.0.norm3.weight"]
    merge = "layers.0.downsample.reduction.weight"
    assert out[f"backbone.body.{merge}"] is sd[f"backbone.0.{merge}"]
    assert not any("relative_position_index" in k for k in out)
    assert ("backbone.body.norm0.weight" in out) == (scale == "5scale")


def test_wrong_relative_position_index_is_an_error_naming_the_key():
    sd = official_keys("swinl_4scale")
    sd[REL_INDEX] = swin_relative_position_index(12).flip(0)
    with pytest.raises(UserError, match=r"layers\.2\.blocks\.5\.attn\.relative_position_index.*12x12 window"):
        convert_official_state_dict(sd, "dino_swinl_4scale", check_aliases=False)
    sd[REL_INDEX] = swin_relative_position_index(7)  # a window-7 Swin (e.g. swin_L_224_22k)
    with pytest.raises(UserError, match=r"relative_position_index.*shape \(49, 49\), expected \(144, 144\)"):
        convert_official_state_dict(sd, "dino_swinl_4scale", check_aliases=False)


def test_missing_swin_key_names_the_official_key():
    sd = official_keys("swinl_4scale")
    del sd["backbone.0.layers.2.blocks.17.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing key.*backbone\.0\.layers\.2\.blocks\.17\.mlp\.fc2\.bias"):
        convert_official_state_dict(sd, "dino_swinl_4scale", check_aliases=False)


def test_5scale_swinl_checkpoint_with_4scale_preset_fails_clearly():
    with pytest.raises(ValueError, match=r"unexpected key.*backbone\.0\.norm0\.weight"):
        convert_official_state_dict(official_keys("swinl_5scale"), "dino_swinl_4scale", check_aliases=False)


def test_swinl_checkpoint_with_r50_preset_and_back_fail_clearly():
    with pytest.raises(ValueError, match=r"unexpected key.*backbone\.0\.patch_embed"):
        convert_official_state_dict(official_keys("swinl_4scale"), "dino_r50_4scale", check_aliases=False)
    with pytest.raises(ValueError, match=r"unexpected key.*backbone\.0\.body\.conv1\.weight"):
        convert_official_state_dict(official_keys("r50_4scale"), "dino_swinl_4scale", check_aliases=False)
