"""COCO-format dataset: output contract, labels = category ids, cleaning, clear errors on bad datasets; collate."""
import json
import logging
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_convert

from dino.config import DataConfig
from dino.data import CocoDetection, build_dataset, collate_fn, read_categories
from dino.data.coco import ImageError
from dino.errors import UserError
from dino.data.transforms import IMAGENET_MEAN, IMAGENET_STD

CATS = [{"id": 5, "name": "five"}, {"id": 2, "name": "two"}, {"id": 9, "name": "nine"}]


def make_dataset(root, images=None, annotations=None, categories=None, write_images=True, drop=()):
    """Writes a tiny COCO dataset (64x48 images) and returns (images_dir, json path)."""
    images = images if images is not None else [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}]
    annotations = annotations if annotations is not None else []
    data = {"images": images, "annotations": annotations, "categories": categories if categories is not None else CATS}
    for key in drop:
        del data[key]
    (root / "img").mkdir(exist_ok=True)
    if write_images:
        rng = np.random.default_rng(0)
        for img in images:
            pixels = rng.integers(0, 256, size=(img.get("height", 8), img.get("width", 8), 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "img" / img["file_name"])
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return root / "img", path


def ann(aid, bbox, category_id=2, image_id=1, **extra):
    return {"id": aid, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


SHAPES_CFG = dict(
    train_scales=(48, 64),
    train_max_size=100,
    crop_resize_scales=(48,),
    crop_size=(32, 48),
    val_scale=64,
    val_max_size=100,
    shapes_train_images=6,
    shapes_val_images=3,
    shapes_image_size=64,
)


@pytest.fixture(scope="module")
def shapes_cfg(tmp_path_factory):
    return DataConfig(root=str(tmp_path_factory.mktemp("shapes") / "ds"), **SHAPES_CFG)


def test_val_sample_contract_and_exact_normalisation(shapes_cfg):
    ds = build_dataset(shapes_cfg, "val")
    assert len(ds) == 3 and ds.num_classes == 4  # shapes ids 1..3 are the labels
    assert ds.label_to_category_id == {1: 1, 2: 2, 3: 3}
    image, target = ds[0]
    # val_scale equals the image size: no resize, so the image is exactly the normalised file
    raw = torch.from_numpy(np.array(ds.load_image(0))).permute(2, 0, 1).float() / 255
    expected = (raw - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(image, expected, atol=1e-5, rtol=0)
    assert type(image) is torch.Tensor and type(target["boxes"]) is torch.Tensor
    assert set(target) == {"labels", "boxes", "image_id", "orig_size", "size"}
    assert target["labels"].dtype == torch.int64 and target["boxes"].dtype == torch.float32
    assert target["boxes"].shape == (len(target["labels"]), 4)
    assert target["orig_size"].tolist() == [64, 64] and target["size"].tolist() == [64, 64]
    assert isinstance(target["image_id"], int)
    # boxes are cxcywh normalised: back in pixels they are the json boxes
    coco = ds.coco
    gt = sorted(a["bbox"] for a in coco.loadAnns(coco.getAnnIds(imgIds=target["image_id"])))
    xyxy = box_convert(target["boxes"], "cxcywh", "xyxy") * 64
    got = sorted(torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1).tolist())
    np.testing.assert_allclose(got, gt, atol=1e-4)


def test_train_samples_and_collate(shapes_cfg):
    ds = build_dataset(shapes_cfg, "train")
    torch.manual_seed(0)
    samples = [ds[i % len(ds)] for i in range(8)]
    for image, target in samples:
        h, w = target["size"].tolist()
        assert image.shape == (3, h, w) and max(h, w) <= 100
        boxes = target["boxes"]
        assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > 0).all()
    images, mask, targets = collate_fn(samples)
    H = max(t["size"][0] for t in targets)
    W = max(t["size"][1] for t in targets)
    assert images.shape == (8, 3, H, W) and mask.shape == (8, H, W) and mask.dtype == torch.bool
    for i, (image, target) in enumerate(samples):
        h, w = target["size"].tolist()
        assert not mask[i, :h, :w].any() and mask[i, h:].all() and mask[i, :, w:].all()
        assert torch.equal(images[i, :, :h, :w], image)
        assert images[i, :, h:].abs().sum() == 0 and images[i, :, :, w:].abs().sum() == 0
    assert targets[3] is samples[3][1]
    batch = partial(collate_fn, size_divisibility=32)(samples[:2])
    assert batch.images.shape[-2] % 32 == 0 and batch.images.shape[-1] % 32 == 0
    assert batch.mask.shape == batch.images.shape[:1] + batch.images.shape[2:]


def test_dataloader_with_workers(shapes_cfg):
    ds = build_dataset(shapes_cfg, "val")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate_fn)
    batches = list(loader)
    assert [b.images.shape[0] for b in batches] == [2, 1]
    assert [t["image_id"] for b in batches for t in b.targets] == ds.image_ids


def test_labels_are_category_ids(tmp_path):
    anns = [ann(1, [0, 0, 10, 10], 5), ann(2, [5, 5, 10, 10], 2), ann(3, [20, 10, 10, 10], 9)]
    images_dir, path = make_dataset(tmp_path, annotations=anns)
    ds = CocoDetection(images_dir, path)
    assert ds.num_classes == 10  # max category id + 1, COCO ids kept
    assert ds.label_to_category_id == {2: 2, 5: 5, 9: 9}
    assert ds[0][1]["labels"].tolist() == [5, 2, 9]
    expected = [{"id": 2, "name": "two"}, {"id": 5, "name": "five"}, {"id": 9, "name": "nine"}]
    assert ds.categories == expected
    assert read_categories(path) == (10, expected)


def test_read_categories_names_the_file(tmp_path):
    _, path = make_dataset(tmp_path, categories=[{"id": 3}, {"id": 0, "name": "zero"}])
    assert read_categories(path) == (4, [{"id": 0, "name": "zero"}, {"id": 3, "name": "class 3"}])
    _, path = make_dataset(tmp_path, categories=[])
    with pytest.raises(UserError, match=r"instances.json: 'categories' is empty"):
        read_categories(path)
    _, path = make_dataset(tmp_path, categories=[{"id": -1, "name": "neg"}])
    with pytest.raises(UserError, match=r"instances.json: categories\[0\] has id -1; expected an int >= 0"):
        read_categories(path)
    with pytest.raises(UserError, match=r"nope.json does not exist"):
        read_categories(tmp_path / "nope.json")


def test_cleaning_crowd_degenerate_clipped_and_empty_images(tmp_path):
    images = [
        {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
        {"id": 2, "file_name": "b.png", "width": 64, "height": 48},
    ]
    anns = [
        ann(1, [10, 10, 20, 20]),
        ann(2, [10, 10, 0, 20]),  # zero width: dropped
        ann(3, [10, 10, 20, -1]),  # negative height: dropped
        ann(4, [50, 40, 30, 30]),  # partly outside: clipped to (50, 40, 64, 48)
        ann(5, [0, 0, 30, 30], iscrowd=1),  # crowd: dropped
        ann(6, [-5, -5, 10, 10]),  # clipped to (0, 0, 5, 5)
    ]
    images_dir, path = make_dataset(tmp_path, images=images, annotations=anns)
    ds = CocoDetection(images_dir, path)
    assert len(ds) == 2  # image 2 has no boxes but is kept
    boxes, labels = ds.raw_target(0)
    np.testing.assert_array_equal(boxes, [[10, 10, 30, 30], [50, 40, 64, 48], [0, 0, 5, 5]])
    assert labels.tolist() == [2, 2, 2]
    assert ds.dropped_boxes == 2  # the two zero-size boxes; the crowd one is not a training target either
    assert ds.dropped == {"zero width": [2], "negative height": [3]}
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["image_id"] == 2
    _, target = ds[0]
    torch.testing.assert_close(target["boxes"][1], torch.tensor([57 / 64, 44 / 48, 14 / 64, 8 / 48]))
    # crowd annotations stay in the evaluation ground truth (with defaults filled in); dropped ones leave it too
    assert sorted(ds.coco.getAnnIds()) == [1, 4, 5, 6]
    assert ds.coco.anns[1]["iscrowd"] == 0 and ds.coco.anns[1]["area"] == 400


def test_empty_annotation_list_is_fine(tmp_path):
    ds = CocoDetection(*make_dataset(tmp_path, annotations=[]))
    assert len(ds) == 1 and ds.num_classes == 10 and ds[0][1]["boxes"].shape == (0, 4) and ds.dropped_boxes == 0


def test_box_entirely_outside_its_image_is_dropped_and_counted(tmp_path, caplog):
    """One bad box must not stop the whole dataset: the official code clips it to the image and drops it."""
    images = [
        {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
        {"id": 2, "file_name": "b.png", "width": 64, "height": 48},
    ]
    anns = [
        ann(1, [70, 10, 5, 5]),  # right of the image
        ann(2, [10, 48, 5, 5], category_id=9),  # starts on the bottom edge: zero height after clipping
        ann(3, [-20, -20, 10, 10], image_id=2),  # above-left
        ann(4, [10, 10, 20, 20], category_id=5, image_id=2),  # kept
    ]
    images_dir, path = make_dataset(tmp_path, images=images, annotations=anns)
    with caplog.at_level(logging.WARNING, logger="dino.data"):
        ds = CocoDetection(images_dir, path)
    assert ds.dropped_boxes == 3
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: dropped 3 box(es) from training and from the evaluation ground truth (3 entirely outside the "
        "image; annotation ids 1, 2, 3)"
    ]
    assert ds.raw_target(0)[0].shape == (0, 4)
    boxes, labels = ds.raw_target(1)
    np.testing.assert_array_equal(boxes, [[10, 10, 30, 30]])
    assert labels.tolist() == [5] and ds[1][1]["labels"].tolist() == [5]
    assert ds.coco.getAnnIds() == [4]  # evaluation leaves them out too (no detection could ever match them)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        ({"images": []}, UserError, r"instances.json: 'images' is empty"),
        ({"drop": ("annotations",)}, UserError, r"instances.json: missing required top-level field 'annotations'"),
        ({"annotations": [{"id": 7, "image_id": 1, "category_id": 2}]}, UserError, r"annotations\[0\] \(id 7\) is missing required field 'bbox'"),
        ({"images": [{"id": 1, "file_name": "a.png", "width": 64}]}, UserError, r"images\[0\] \(id 1\) is missing required field 'height'"),
        ({"annotations": [ann(7, [0, 0, 5, 5], category_id=4)]}, UserError, r"annotation id 7 has category_id 4, which is not in 'categories'"),
        ({"annotations": [ann(8, [0, 0, 5, 5], image_id=3)]}, UserError, r"annotation id 8 references image_id 3, which is not in 'images'"),
        ({"annotations": [ann(9, [0, 0, 5])]}, UserError, r"annotation id 9 has bbox \[0, 0, 5\]; expected 4 finite numbers"),
        ({"annotations": [ann(1, [0, 0, 5, 5]), ann(1, [0, 0, 6, 6])]}, UserError, r"duplicate id 1 in 'annotations'"),
        ({"categories": []}, UserError, r"'categories' is empty"),
        ({"images": [{"id": "a", "file_name": "a.png", "width": 64, "height": 48}], "write_images": False}, UserError, r"images\[0\] has id 'a'; expected an int >= 0"),
        ({"images": [{"id": 1, "file_name": "a.png", "width": 0, "height": 48}], "write_images": False}, UserError, r"images\[0\] has width 0; expected an int >= 1"),
    ],
)
def test_bad_json_content_names_file_and_entry(tmp_path, kwargs, error, pattern):
    images_dir, path = make_dataset(tmp_path, **kwargs)
    with pytest.raises(error, match=pattern) as info:
        CocoDetection(images_dir, path)
    assert str(path) in str(info.value)


def test_missing_and_unparseable_json(tmp_path):
    with pytest.raises(UserError, match=r"annotations file .*nope.json does not exist"):
        CocoDetection(tmp_path, tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(UserError, match=r"bad.json is not valid JSON"):
        CocoDetection(tmp_path, bad)


def test_missing_image_files_listed_up_front(tmp_path):
    images = [{"id": i, "file_name": f"{i}.png", "width": 8, "height": 8} for i in range(8)]
    images_dir, path = make_dataset(tmp_path, images=images)
    for i in (1, 2, 3, 4, 5, 6):
        (images_dir / f"{i}.png").unlink()
    with pytest.raises(UserError, match=r"6 of 8 images listed in .*instances.json are missing from .*img: 1.png, 2.png, 3.png, 4.png, 5.png, \.\.\."):
        CocoDetection(images_dir, path)
    with pytest.raises(UserError, match=r"images folder .*elsewhere .*does not exist"):
        CocoDetection(tmp_path / "elsewhere", path)


def test_image_size_mismatch_names_the_file(tmp_path):
    images_dir, path = make_dataset(tmp_path)
    Image.new("RGB", (32, 32)).save(images_dir / "a.png")
    ds = CocoDetection(images_dir, path)
    with pytest.raises(ImageError, match=r"a.png \(image id 1\) is 32x32 but .*instances.json says 64x48"):
        ds[0]


def test_build_dataset_rejects_unknown_dataset_and_split(shapes_cfg):
    with pytest.raises(UserError, match="data.dataset"):
        build_dataset(DataConfig(dataset="voc"), "train")
    with pytest.raises(ValueError, match="split"):
        build_dataset(shapes_cfg, "test")


def test_build_dataset_coco_paths_relative_to_root(tmp_path):
    images_dir, path = make_dataset(tmp_path, annotations=[ann(1, [0, 0, 10, 10], 9)])
    cfg = DataConfig(dataset="coco", root=str(tmp_path), val_images="img", val_annotations=str(path),
                     val_scale=48, val_max_size=100)
    ds = build_dataset(cfg, "val")
    assert ds.num_classes == 10 and ds[0][1]["labels"].tolist() == [9] and ds[0][0].shape == (3, 48, 64)
