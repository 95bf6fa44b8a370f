"""DINO model: I/O contract shapes, train-mode denoising, dtype, backbones, presets, parameter count."""
from __future__ import annotations

import pytest
import safetensors.torch
import torch

import dino
from dino.config import BackboneConfig, DenoisingConfig, ModelConfig, TransformerConfig
from dino.errors import UserError
from dino.models.backbone import Backbone
from dino.models.dino import DINO, _downsample_mask
from dino.presets import PRESETS, get_preset


def tiny_config(**overrides) -> ModelConfig:
    cfg = ModelConfig(
        backbone=BackboneConfig(name="resnet18", return_levels=(1, 2, 3)),
        transformer=TransformerConfig(hidden_dim=64, nheads=4, enc_layers=1, dec_layers=3, dim_feedforward=128,
                                      num_feature_levels=4, num_queries=30),
        denoising=DenoisingConfig(dn_number=6, labelbook_size=5),
        num_classes=5,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def batch(b=2, h=64, w=96):
    torch.manual_seed(0)
    images = torch.randn(b, 3, h, w)
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    mask[1:, :, w - 24 :] = True
    mask[1:, h - 16 :, :] = True
    images[mask[:, None].expand_as(images)] = 0
    return images, mask


def targets():
    return [
        {"labels": torch.tensor([1, 4]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.2], [0.2, 0.3, 0.1, 0.2]])},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.6, 0.2, 0.2]])},
    ]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return DINO(tiny_config())


def test_param_count_of_r50_4scale_equals_official():
    with torch.device("meta"):
        model = dino.build_model("dino_r50_4scale")
    assert sum(p.numel() for p in model.parameters()) == 46_893_182


def test_eval_outputs_follow_contract(tiny_model):
    tiny_model.eval()
    images, mask = batch()
    with torch.inference_mode():
        out = tiny_model(images, mask)
    assert out["pred_logits"].shape == (2, 30, 5) and out["pred_boxes"].shape == (2, 30, 4)
    assert len(out["aux_outputs"]) == 2
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 30, 5) and aux["pred_boxes"].shape == (2, 30, 4)
    assert out["interm_outputs"]["pred_logits"].shape == (2, 30, 5)
    assert out["interm_outputs"]["pred_boxes"].shape == (2, 30, 4)
    assert "dn_meta" not in out
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()


def test_train_with_targets_returns_dn_outputs_and_matching_part_is_unaffected(tiny_model):
    tiny_model.train()
    images, mask = batch()
    out = tiny_model(images, mask, targets())
    meta = out["dn_meta"]
    max_gt, groups = 2, 6 // 2
    assert meta["num_dn_group"] == groups and meta["pad_size"] == 2 * max_gt * groups
    known = meta["output_known_lbs_bboxes"]
    assert known["pred_logits"].shape == (2, meta["pad_size"], 5)
    assert known["pred_boxes"].shape == (2, meta["pad_size"], 4)
    assert len(known["aux_outputs"]) == 2
    assert out["pred_logits"].shape == (2, 30, 5)
    # The attention mask hides the denoising queries from the matching ones: same matching outputs without them.
    plain = tiny_model(images, mask)
    assert "dn_meta" not in plain
    torch.testing.assert_close(out["pred_logits"], plain["pred_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["aux_outputs"][0]["pred_boxes"], plain["aux_outputs"][0]["pred_boxes"],
                               rtol=0, atol=1e-5)
    # Denoising trains the label embedding and the shared heads.
    (known["pred_logits"].sum() + known["pred_boxes"].sum()).backward()
    assert tiny_model.label_enc.weight.grad.abs().sum() > 0
    assert tiny_model.class_embed.weight.grad.abs().sum() > 0
    tiny_model.zero_grad()


def test_float64_forward(tiny_model):
    model = DINO(tiny_config()).double().eval()
    images, mask = batch()
    with torch.inference_mode():
        out = model(images.double(), mask)
    assert out["pred_logits"].dtype == torch.float64 and out["pred_boxes"].dtype == torch.float64
    assert torch.isfinite(out["pred_logits"]).all()


def test_float16_model_matches_float32_on_the_same_query_selection():
    """``model.half()`` (the ``dino export --fp16`` detector) runs: its float32 anchors and sampling coordinates meet
    float16 layers. On float32's query selection its outputs stay close (measured here: 1e-4 probability, 4e-5 of
    the image side; the bound leaves 20x or more)."""
    torch.manual_seed(0)
    model = DINO(tiny_config()).eval()
    nn_init = torch.Generator().manual_seed(1)
    for head in (model.bbox_embed, model.transformer.enc_out_bbox_embed):  # boxes away from their anchors
        head.layers[-1].weight.data = torch.randn(head.layers[-1].weight.shape, generator=nn_init) * 0.02
    images, mask = batch()
    with torch.inference_mode():
        ref = model(images, mask)
        half = model.half()(images.half(), mask, query_indices=ref["query_indices"])
    assert half["pred_logits"].dtype == torch.float16
    assert half["pred_boxes"].dtype == torch.float32  # refined boxes stay float32 (anchors + float16 deltas)
    torch.testing.assert_close(half["pred_logits"].float().sigmoid(), ref["pred_logits"].sigmoid(), rtol=0, atol=2e-3)
    torch.testing.assert_close(half["pred_boxes"], ref["pred_boxes"], rtol=0, atol=2e-3)
    assert not torch.equal(half["pred_boxes"], ref["pred_boxes"])  # it did compute in float16


def test_state_dict_has_one_key_per_parameter_and_saves_as_safetensors(tiny_model, tmp_path):
    sd = tiny_model.state_dict()
    assert "class_embed.weight" in sd and "bbox_embed.layers.2.bias" in sd
    assert not any(".class_embed.0" in k or k.startswith("class_embed.0") for k in sd)
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(sd, path)
    fresh = DINO(tiny_config())
    fresh.load_state_dict(safetensors.torch.load_file(path), strict=True)
    assert torch.equal(fresh.class_embed.weight, tiny_model.class_embed.weight)


def test_bad_inputs_are_clear_errors(tiny_model):
    tiny_model.eval()
    images, mask = batch()
    with pytest.raises(ValueError, match="mask must be bool"):
        tiny_model(images, mask[:, :10])
    with pytest.raises(ValueError, match="num_queries=30"):
        tiny_model(images[:, :, :16, :16], mask[:, :16, :16])
    with pytest.raises(ValueError, match="unknown model preset 'nope'.*dino_r50_4scale"):
        dino.build_model("nope")


@pytest.mark.parametrize("name,levels,channels,strides", [
    ("resnet50", (1, 2, 3), [512, 1024, 2048], [8, 16, 32]),
    ("resnet50", (0, 1, 2, 3), [256, 512, 1024, 2048], [4, 8, 16, 32]),
    ("resnet18", (1, 2, 3), [128, 256, 512], [8, 16, 32]),
])
def test_resnet_backbone_levels(name, levels, channels, strides):
    with torch.device("meta"):
        bb = Backbone(BackboneConfig(name=name, return_levels=levels))
    assert bb.num_channels == channels and bb.strides == strides
    frozen = {n for n, p in bb.named_parameters() if not p.requires_grad}
    assert "body.conv1.weight" in frozen and any(n.startswith("body.layer1.") for n in frozen)
    assert not any(n.startswith(("body.layer2.", "body.layer4.")) for n in frozen)
    if name == "resnet18":
        feats = Backbone(BackboneConfig(name=name, return_levels=levels))(torch.randn(1, 3, 64, 96))
        assert [tuple(f.shape) for f in feats] == [(1, c, 64 // s, 96 // s) for c, s in zip(channels, strides)]


def test_timm_nhwc_backbone_is_permuted_to_nchw():
    cfg = BackboneConfig(name="timm:swin_tiny_patch4_window7_224", return_levels=(1, 2, 3),
                         timm_kwargs={"dynamic_img_size": True})
    bb = Backbone(cfg)
    feats = bb(torch.randn(1, 3, 64, 96))
    assert bb.num_channels == [192, 384, 768] and bb.strides == [8, 16, 32]
    assert [tuple(f.shape) for f in feats] == [(1, 192, 8, 12), (1, 384, 4, 6), (1, 768, 2, 3)]


def test_pretrained_file_is_loaded_and_bad_file_named(tmp_path):
    src = Backbone(BackboneConfig(name="resnet18"))
    path = tmp_path / "r18.pth"
    torch.save({k.removeprefix("body."): v for k, v in src.state_dict().items()}, path)
    loaded = Backbone(BackboneConfig(name="resnet18", pretrained=str(path)))
    assert torch.equal(loaded.body.layer3[0].conv1.weight, src.body.layer3[0].conv1.weight)
    with pytest.raises(UserError, match=r"^model.backbone.pretrained: no such file .*missing.pth"):
        Backbone(BackboneConfig(name="resnet18", pretrained=str(tmp_path / "missing.pth")))
    torch.save({"unrelated.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth"):
        Backbone(BackboneConfig(name="resnet18", pretrained=str(tmp_path / "other.pth")))


def test_presets_build_without_download():
    assert set(PRESETS) >= {"dino_r50_4scale", "dino_r50_5scale", "dino_swinl_4scale", "dino_swinl_5scale",
                            "dino_quickstart"}
    with torch.device("meta"):
        swin = dino.build_model("dino_swinl_4scale")
        r50_5 = dino.build_model("dino_r50_5scale")
    assert swin.backbone.num_channels == [384, 768, 1536] and swin.num_classes == 91
    assert len(r50_5.input_proj) == 5 and r50_5.backbone.strides == [4, 8, 16, 32]
    assert get_preset("dino_quickstart").num_classes == 4  # shapes category ids 1..3 are the labels


def test_official_presets_keep_the_official_coco_head():
    with torch.device("meta"):
        model = dino.build_model("dino_r50_4scale")
    # 91 classes (COCO ids 1..90 as labels) and a label book of 91 (+1 row), as the official checkpoints
    assert model.class_embed.out_features == 91 and model.label_enc.num_embeddings == 92
    assert model.transformer.enc_out_class_embed.out_features == 91


def test_label_book_defaults_to_num_classes():
    with torch.device("meta"):
        model = DINO(tiny_config(num_classes=7, denoising=DenoisingConfig(dn_number=6)))
        bigger = DINO(tiny_config(num_classes=7, denoising=DenoisingConfig(dn_number=6, labelbook_size=9)))
    assert model.class_embed.out_features == 7 and model.label_enc.num_embeddings == 8
    assert bigger.label_enc.num_embeddings == 10


def test_label_book_smaller_than_num_classes_fails_at_build():
    """Official #81: with more classes than the label book, denoising indexes past label_enc at random steps."""
    cfg = tiny_config(num_classes=12)  # labelbook_size 5
    with pytest.raises(UserError, match=r"model.denoising.labelbook_size=5 is smaller than model.num_classes=12.*"
                                        r"set model.denoising.labelbook_size=12"):
        DINO(cfg)


def test_num_classes_from_the_dataset_must_be_filled_in_before_build():
    with pytest.raises(UserError, match=r"model.num_classes is not set"):
        dino.build_model(ModelConfig())
    with pytest.raises(UserError, match=r"model.num_classes must be an int >= 1, got 0"):
        DINO(tiny_config(num_classes=0))


def test_quickstart_trains_on_cpu():
    torch.manual_seed(0)
    model = dino.build_model("dino_quickstart").train()
    images, mask = batch(2, 128, 128)
    out = model(images, mask, [{"labels": t["labels"] % 3 + 1, "boxes": t["boxes"]} for t in targets()])
    assert out["pred_logits"].shape == (2, model.num_queries, 4) and "dn_meta" in out  # denoising queries split off


@pytest.mark.cuda
def test_cuda_forward_matches_cpu_and_trains_with_denoising():
    torch.manual_seed(0)
    model = DINO(tiny_config()).eval()
    images, mask = batch()
    with torch.inference_mode():
        ref = model(images, mask)
        out = model.cuda()(images.cuda(), mask.cuda())
    torch.testing.assert_close(out["pred_boxes"].cpu(), ref["pred_boxes"], rtol=0, atol=1e-4)
    torch.testing.assert_close(out["pred_logits"].cpu(), ref["pred_logits"], rtol=0, atol=1e-3)
    model.train()
    tg = [{k: v.cuda() for k, v in t.items()} for t in targets()]
    out = model(images.cuda(), mask.cuda(), tg)
    known = out["dn_meta"]["output_known_lbs_bboxes"]
    (out["pred_logits"].sum() + known["pred_boxes"].sum()).backward()
    assert model.label_enc.weight.grad is not None and torch.isfinite(model.label_enc.weight.grad).all()


def test_resnet_gradient_checkpointing_gives_same_features_and_grads():
    torch.manual_seed(0)
    plain = Backbone(BackboneConfig(name="resnet18")).train()
    ckpt = Backbone(BackboneConfig(name="resnet18", gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    grads = []
    for bb in (plain, ckpt):
        feats = bb(x)
        sum(f.square().sum() for f in feats).backward()
        grads.append(bb.body.layer2[0].conv1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(plain(x)[-1], ckpt(x)[-1])


def test_padding_mask_downsampling_is_exactly_nearest_interpolation():
    """``_downsample_mask`` (a gather, for export) picks the rows/columns of DETR's F.interpolate nearest rule."""
    gen = torch.Generator().manual_seed(0)
    for size in [*range(1, 130), 240, 320, 333, 480, 512, 640, 800, 1024, 1333, 1344]:
        for out in sorted({max(1, -(-size // s)) for s in (2, 4, 8, 16, 32, 64)} | {max(1, size // 3), size * 2}):
            mask = torch.rand(2, size, 3, generator=gen) > 0.5
            expected = torch.nn.functional.interpolate(mask[None].float(), size=(out, 3)).bool()[0]
            assert torch.equal(_downsample_mask(mask, (out, 3)), expected), (size, out)
