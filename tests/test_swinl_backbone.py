"""The official-DINO Swin backbone: sizes, padding, checkpointing, pretrained weights (never downloaded here)."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer as TimmSwin

import dino
from dino.config import BackboneConfig
from dino.errors import UserError
from dino.models.backbone import Backbone, load_swin_pretrained, timm_swin_to_official
from dino.models.swin import SwinSpec, SwinTransformer

TINY = SwinSpec(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4)
SWINL = "swin_large_patch4_window12_384"


def tiny_swin(**kwargs) -> SwinTransformer:
    torch.manual_seed(0)
    return SwinTransformer(TINY, (0, 1, 2, 3), **kwargs)


@pytest.mark.parametrize("preset,params", [("dino_swinl_4scale", 217_230_066), ("dino_swinl_5scale", 217_576_690)])
def test_swinl_parameter_count_equals_official(preset, params):
    with torch.device("meta"):
        model = dino.build_model(preset)
    assert sum(p.numel() for p in model.parameters()) == params
    assert all(p.requires_grad for p in model.backbone.parameters())  # official: no Swin stage frozen


def test_swinl_structure_drop_path_and_checkpointing():
    with torch.device("meta"):
        bb = Backbone(BackboneConfig(name=SWINL, return_levels=(1, 2, 3), freeze_stem_and_layer1=False,
                                     gradient_checkpointing=True))
    assert bb.num_channels == [384, 768, 1536] and bb.strides == [8, 16, 32]
    assert [len(s.blocks) for s in bb.body.layers] == [2, 2, 18, 2]
    assert [s.blocks[0].attn.num_heads for s in bb.body.layers] == [6, 12, 24, 48]
    assert {b.window for s in bb.body.layers for b in s.blocks} == {12}
    assert [b.shift for b in bb.body.layers[2].blocks[:3]] == [0, 6, 0]
    assert all(s.use_checkpoint for s in bb.body.layers)
    blocks = [b for s in bb.body.layers for b in s.blocks]
    assert isinstance(blocks[0].drop_path, torch.nn.Identity)
    assert blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    assert blocks[1].drop_path.drop_prob == pytest.approx(0.2 / 23)
    names = {k for k in bb.body.state_dict()}
    assert {"norm1.weight", "norm3.bias", "layers.2.downsample.reduction.weight", "patch_embed.proj.weight"} <= names
    assert "norm0.weight" not in names and not any("relative_position_index" in k for k in names)


def test_feature_sizes_for_any_input_size():
    body = tiny_swin().eval()
    feats = body(torch.randn(1, 3, 70, 101))
    # ceil(70/4)=18, ceil(101/4)=26, then (n+1)//2 per stage
    assert [tuple(f.shape) for f in feats] == [(1, 16, 18, 26), (1, 32, 9, 13), (1, 64, 5, 7), (1, 128, 3, 4)]


def test_input_is_zero_padded_to_whole_patches():
    body = tiny_swin().double().eval()
    x = torch.randn(1, 3, 62, 90, dtype=torch.float64)
    with torch.no_grad():
        a = body(x)
        b = body(F.pad(x, (0, 2, 0, 2)))
    for fa, fb in zip(a, b):
        assert torch.equal(fa, fb)


def test_matches_timm_swin_with_timm_weights_renamed():
    """At sizes where every stage is larger than a window, timm's Swin computes the same function: this checks the
    timm -> official renaming (downsample moved back to the end of the previous stage) and our blocks."""
    torch.manual_seed(0)
    ref = TimmSwin(img_size=256, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4,
                   num_classes=5).double().eval()
    for p in ref.parameters():  # non-trivial LayerNorm/bias values
        p.data.add_(0.05 * torch.randn_like(p))
    ours = tiny_swin().double().eval()
    load_swin_pretrained(ours, timm_swin_to_official(ref.state_dict()), "timm")
    x = torch.randn(1, 3, 256, 256, dtype=torch.float64)
    with torch.no_grad():
        got = ours(x)
        h = ref.patch_embed(x)
        for i, stage in enumerate(ref.layers):
            h = stage(h)
            want = getattr(ours, f"norm{i}")(h).permute(0, 3, 1, 2)
            assert (got[i] - want).abs().max().item() < 1e-12, i


def test_gradient_checkpointing_gives_same_features_and_grads():
    x = torch.randn(1, 3, 40, 40)
    plain, ckpt = tiny_swin().train(), tiny_swin(use_checkpoint=True).train()
    assert ckpt.layers[0].use_checkpoint
    grads, feats = [], []
    for body in (plain, ckpt):
        torch.manual_seed(1)  # same stochastic-depth draws; checkpointing replays them in the recomputation
        out = body(x)
        sum(f.square().sum() for f in out).backward()
        feats.append(out[-1].detach())
        grads.append(body.layers[1].blocks[1].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(feats[0], feats[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1])


def test_official_pretrained_file_layout_loads_non_strictly():
    src = tiny_swin()
    # The official classification file: our names, plus the classifier head, final norm, stored masks and indices.
    sd = {k: v.clone() for k, v in src.state_dict().items() if not k.startswith("norm")}
    sd.update({"head.weight": torch.zeros(7, 128), "head.bias": torch.zeros(7), "norm.weight": torch.ones(128),
               "norm.bias": torch.zeros(128), "layers.0.blocks.1.attn_mask": torch.zeros(4, 16, 16),
               "layers.0.blocks.0.attn.relative_position_index": src.layers[0].blocks[0].attn.relative_position_index})
    dst = SwinTransformer(TINY, (0, 1, 2, 3))
    norm_before = dst.norm2.weight.clone()
    load_swin_pretrained(dst, sd, "swin_tiny_22k.pth")
    assert torch.equal(dst.layers[3].blocks[1].mlp.fc2.weight, src.layers[3].blocks[1].mlp.fc2.weight)
    assert torch.equal(dst.norm2.weight, norm_before)  # per-stage norms are not in the file: keep their init

    bad = dict(sd, **{"layers.0.blocks.0.attn.relative_position_index": torch.zeros(16, 16, dtype=torch.long)})
    with pytest.raises(UserError, match=r"swin_tiny_22k.pth.*layers\.0\.blocks\.0\.attn\.relative_position_index"):
        load_swin_pretrained(dst, bad, "swin_tiny_22k.pth")
    partial = {k: v for k, v in sd.items() if not k.startswith("layers.3")}
    with pytest.raises(UserError, match=r"not a Swin checkpoint of this size.*layers\.3"):
        load_swin_pretrained(dst, partial, "other.pth")
    wrong = dict(sd, **{"patch_embed.proj.weight": torch.zeros(16, 3, 2, 2)})
    with pytest.raises(UserError, match=r"patch_embed\.proj\.weight.*\(16, 3, 2, 2\)"):
        load_swin_pretrained(dst, wrong, "other.pth")


def test_failed_timm_fetch_says_how_to_use_a_local_file(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(timm, "create_model", offline)
    cfg = BackboneConfig(name=SWINL, freeze_stem_and_layer1=False, pretrained="timm")
    with torch.device("meta"), pytest.raises(UserError) as err:
        Backbone(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert "swin_large_patch4_window12_384.ms_in22k" in msg and "network unreachable" in msg
    assert "swin_large_patch4_window12_384_22k.pth" in msg and "backbone.pretrained=" in msg


def test_bad_swin_backbone_settings_are_named(tmp_path):
    with torch.device("meta"):
        with pytest.raises(UserError, match="freeze_stem_and_layer1"):
            Backbone(BackboneConfig(name=SWINL))
        with pytest.raises(UserError, match="torchvision"):
            Backbone(BackboneConfig(name=SWINL, freeze_stem_and_layer1=False, pretrained="torchvision"))
        torch.save({"model": {"conv1.weight": torch.zeros(1)}}, tmp_path / "r50.pth")
        with pytest.raises(UserError, match=r"r50.pth.*not a Swin checkpoint"):
            Backbone(BackboneConfig(name=SWINL, freeze_stem_and_layer1=False, pretrained=str(tmp_path / "r50.pth")))
