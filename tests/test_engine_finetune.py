"""Fine-tuning an official checkpoint on a 3-class COCO-format set in one command, never downloading anything."""
import json
import urllib.error

import pytest
import torchvision.models._api
from safetensors import safe_open
from safetensors.torch import load_file

from dino.engine.recipe import load_recipe
from dino.engine.setup import build_model
from dino.errors import UserError


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to fetch torchvision weights fails as it would without internet."""
    def unreachable(url, *args, **kwargs):
        raise urllib.error.URLError(f"no network in tests ({url})")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", unreachable)


def test_a_failed_backbone_download_is_one_line_saying_what_to_do(offline):
    cfg = load_recipe("dino_r50_4scale_12ep")
    assert cfg.model.backbone.pretrained == "torchvision"
    with pytest.raises(UserError) as err:
        build_model(cfg.model, weights_follow=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("model.backbone.pretrained='torchvision': fetching the pretrained weights of backbone "
                              "'resnet50' failed (URLError")
    assert "--set model.backbone.pretrained=/path/to/weights.pth" in message
    build_model(cfg.model, weights_follow=True)  # a checkpoint follows: nothing is fetched


@pytest.mark.filterwarnings("ignore:.*per-layer copies of the shared heads differ")  # synthetic weights, not real ones
def test_finetune_official_checkpoint_to_three_classes(tmp_path, offline, official_r50_4scale_pth):
    from dino_cli import main

    pth = official_r50_4scale_pth
    assert main(["convert-official", str(pth), str(tmp_path / "converted.safetensors")]) == 0
    converted = load_file(str(tmp_path / "converted.safetensors"))

    out = tmp_path / "out"
    # The official R50 recipe (backbone.pretrained left at "torchvision") on the 3-class shapes set (category ids
    # 1..3 kept: 4 classes, label book 4); 2 steps of 1 image. To stay fast on a CPU: 96 px images and 100 queries
    # (the learnt query embedding, sized by the query count, is skipped with --ignore-keys).
    rc = main(["train", "dino_r50_4scale_12ep", "--finetune-from", str(pth), "--ignore-keys", "tgt_embed", "--set",
               "data.dataset=shapes", f"data.root={tmp_path / 'shapes'}", "data.train_images=train",
               "data.train_annotations=annotations/train.json", "data.val_images=val",
               "data.val_annotations=annotations/val.json", "data.shapes_train_images=2", "data.shapes_val_images=2",
               "data.shapes_image_size=96", "data.train_scales=96", "data.train_max_size=96",
               "data.crop_resize_scales=96", "data.crop_size=64,96", "data.val_scale=96", "data.val_max_size=96",
               "model.transformer.num_queries=100", "model.num_select=100",
               "data.num_workers=0", "model.num_classes=none", "model.denoising.labelbook_size=none",
               "model.denoising.dn_number=10", "optim.total_batch_size=1",
               "optim.batch_size_per_device=1", "optim.epochs=1", "optim.lr_drop_epochs=1", "train.max_steps=2",
               "train.eval_every_epochs=1", "train.checkpoint_every_steps=0", "train.tracker=none",
               f"train.output_dir={out}"])
    assert rc == 0
    tuned = load_file(str(out / "model.safetensors"))
    # New class heads and label book, sized for the 3 categories (ids 1..3).
    assert tuned["class_embed.weight"].shape == (4, 256) and tuned["transformer.enc_out_class_embed.weight"].shape == (4, 256)
    assert tuned["label_enc.weight"].shape == (5, 256)
    assert converted["class_embed.weight"].shape == (91, 256) and converted["label_enc.weight"].shape == (92, 256)
    # Everything else came from the checkpoint: frozen tensors (stem, layer1, frozen BN statistics) are equal, trained
    # ones moved at most 2 AdamW steps (lr 1e-4, backbone 1e-5; |update| <= ~lr per step) from it.
    assert tuned["transformer.tgt_embed.weight"].shape == (100, 256)
    heads = ("class_embed.", "transformer.enc_out_class_embed.", "label_enc.", "transformer.tgt_embed.")
    rest = [k for k in tuned if not k.startswith(heads)]
    assert set(rest) == {k for k in converted if not k.startswith(heads)}
    drift = {k: (tuned[k].double() - converted[k].double()).abs().max().item() for k in rest}
    frozen = [k for k in rest if k.startswith(("backbone.body.conv1", "backbone.body.bn1", "backbone.body.layer1"))
              or k.endswith(("running_mean", "running_var"))]
    assert frozen and all(drift[k] == 0 for k in frozen)
    assert max(drift[k] for k in rest if k.startswith("backbone.")) <= 2 * 1e-5 * 1.1
    assert max(drift.values()) <= 2 * 1e-4 * 1.1
    assert max(drift[k] for k in rest if not k.startswith("backbone.")) > 1e-5  # it did train
    # Evaluated after the epoch; the weights carry the dataset's category names for `dino predict`.
    assert json.loads((out / "eval" / "epoch_001" / "results.json").read_text())["num_images"] == 2
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = [c["name"] for c in json.loads(f.metadata()["categories"])]
    assert names == ["rectangle", "ellipse", "triangle"]
