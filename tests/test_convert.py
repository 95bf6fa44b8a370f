"""Official-checkpoint conversion: parity with the official model's golden outputs, and bad-input errors."""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch

import dino
from dino.convert import convert_official_state_dict, register
from dino.errors import UserError
from tests.official_weights import assert_matches_golden, official_state_dict as filled_state_dict, read_keys

PARITY = Path(__file__).parent / "fixtures" / "parity"


def official_state_dict(scale: str) -> dict[str, torch.Tensor]:
    """Float32 official-named state dict, as the golden run loaded it."""
    return filled_state_dict(PARITY / f"official_keys_r50_{scale}.txt")


def meta_state_dict(scale: str = "4scale") -> dict[str, torch.Tensor]:
    """Right keys and shapes, no memory: enough for the converter's key and shape checks."""
    return {k: torch.empty(s, device="meta") for k, s in read_keys(PARITY / f"official_keys_r50_{scale}.txt")}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dino")
    register(p.add_subparsers(dest="command", required=True))
    return p


@pytest.mark.golden
@pytest.mark.parametrize("scale", ["4scale", "5scale"])
def test_converted_official_weights_reproduce_golden_outputs(scale, tmp_path, request):
    preset = f"dino_r50_{scale}"
    if scale == "4scale":
        # The full CLI path: .pth file in (the session's official checkpoint file), safetensors out, strict load.
        pth, out = request.getfixturevalue("official_r50_4scale_pth"), tmp_path / "converted.safetensors"
        with pytest.warns(UserWarning, match=r"88 per-layer copies.*differ.*bbox_embed\.5"):
            args = parser().parse_args(["convert-official", str(pth), str(out), "--preset", preset])
            rc = args.func(args)
        assert rc == 0
        converted = safetensors.torch.load_file(out)
    else:
        official = official_state_dict(scale)
        with pytest.warns(UserWarning, match="differ"):
            converted = convert_official_state_dict(official, preset)
        del official
    model = dino.build_model(preset)
    model.load_state_dict(converted, strict=True)
    assert_matches_golden(model, PARITY, f"golden_r50_{scale}.safetensors")  # measured 1.5e-14 / 2.1e-14


def test_missing_key_is_named():
    sd = meta_state_dict()
    del sd["transformer.encoder.layers.3.linear1.bias"]
    with pytest.raises(ValueError, match=r"missing key.*transformer\.encoder\.layers\.3\.linear1\.bias"):
        convert_official_state_dict(sd, "dino_r50_4scale", check_aliases=False)


def test_missing_shared_head_names_the_official_key():
    sd = meta_state_dict()
    del sd["class_embed.5.bias"]
    with pytest.raises(ValueError, match=r"missing key.*class_embed\.5\.bias"):
        convert_official_state_dict(sd, "dino_r50_4scale", check_aliases=False)


def test_wrong_shape_names_key_and_shapes():
    sd = meta_state_dict()
    sd["input_proj.0.0.weight"] = torch.empty(256, 1024, 1, 1, device="meta")
    with pytest.raises(ValueError, match=r"input_proj\.0\.0\.weight.*\(256, 1024, 1, 1\).*\(256, 512, 1, 1\)"):
        convert_official_state_dict(sd, "dino_r50_4scale", check_aliases=False)


def test_5scale_checkpoint_with_4scale_preset_fails_clearly():
    with pytest.raises(ValueError, match=r"unexpected key.*input_proj\.4|shape mismatch"):
        convert_official_state_dict(meta_state_dict("5scale"), "dino_r50_4scale", check_aliases=False)


def test_alias_check_warns_only_when_copies_differ():
    # Real checkpoints: every per-layer copy of the shared heads is equal (expanded zeros cost no memory).
    sd = {k: torch.zeros(()).expand(s) for k, s in read_keys(PARITY / "official_keys_r50_4scale.txt")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convert_official_state_dict(sd, "dino_r50_4scale")
    sd["transformer.decoder.class_embed.2.bias"] = torch.ones(91)
    with pytest.warns(UserWarning, match=r"1 per-layer.*transformer\.decoder\.class_embed\.2\.bias != class_embed\.5\.bias"):
        convert_official_state_dict(sd, "dino_r50_4scale")


def test_unexpected_key_is_named():
    sd = meta_state_dict()
    sd["transformer.some_new_head.weight"] = torch.empty(3, device="meta")
    with pytest.raises(ValueError, match=r"unexpected key.*transformer\.some_new_head\.weight"):
        convert_official_state_dict(sd, "dino_r50_4scale", check_aliases=False)


def test_ddp_prefix_and_bare_state_dict_accepted():
    sd = {"module." + k: v for k, v in meta_state_dict().items()}
    out = convert_official_state_dict(sd, "dino_r50_4scale", check_aliases=False)
    assert "class_embed.weight" in out and "backbone.body.conv1.weight" in out
    assert not any(k.startswith(("class_embed.0", "transformer.decoder.class_embed")) for k in out)


def test_not_a_dino_checkpoint(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(2, 3, 1, 1)}}, path)
    args = parser().parse_args(["convert-official", str(path), str(tmp_path / "o.safetensors")])
    with pytest.raises(ValueError, match="not a DINO checkpoint"):
        args.func(args)
    assert not (tmp_path / "o.safetensors").exists()


def test_unreadable_and_missing_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    args = parser().parse_args(["convert-official", str(junk), str(tmp_path / "o.safetensors")])
    with pytest.raises(ValueError, match="junk.pth"):
        args.func(args)
    args = parser().parse_args(["convert-official", str(tmp_path / "nope.pth"), str(tmp_path / "o.safetensors")])
    with pytest.raises(UserError, match="nope.pth"):
        args.func(args)


def test_help_documents_the_command(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["convert-official", "--help"])
    text = capsys.readouterr().out
    assert "official" in text and "--preset" in text and "safetensors" in text


def test_trust_checkpoint_on_a_file_that_is_no_checkpoint_does_not_advise_the_flag_given(tmp_path, capsys):
    """Issue 35 item 18: the advice to rerun with --trust-checkpoint is not given when it was already given."""
    from dino_cli import main

    evil = tmp_path / "evil.pth"
    evil.write_bytes(b"PK\x03\x04 not really a zip archive")
    assert main(["convert-official", str(evil), str(tmp_path / "o.safetensors"), "--trust-checkpoint"]) == 2
    err = capsys.readouterr().err
    assert err == (f"dino convert-official: error: cannot load {str(evil)!r} with torch.load(weights_only=False): "
                   f"{err.split('weights_only=False): ')[1].split(' It is not')[0]} It is not a readable PyTorch "
                   "checkpoint (corrupt, truncated, or not written by torch.save).\n")
    assert "--trust-checkpoint" not in err
    assert main(["convert-official", str(evil), str(tmp_path / "o.safetensors")]) == 2
    assert "convert it with `dino convert-official --trust-checkpoint`" in capsys.readouterr().err


def test_convert_never_replaces_a_file_of_another_kind(tmp_path, capsys):
    from dino_cli import main

    source, other = tmp_path / "official.pth", tmp_path / "photo.png"
    torch.save({"model": {"a": torch.zeros(1)}}, source)
    other.write_bytes(b"a picture")
    assert main(["convert-official", str(source), str(other)]) == 2
    assert capsys.readouterr().err == (f"dino convert-official: error: output {other} exists and is not an older "
                                       f".safetensors file of this kind: writing it would replace that file; choose "
                                       f"another output (e.g. {tmp_path / 'model.safetensors'})\n")
    assert other.read_bytes() == b"a picture"
