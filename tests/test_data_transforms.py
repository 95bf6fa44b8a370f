"""The official augmentations keep boxes on the objects they describe."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from dino.config import DataConfig
from dino.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RandomSizeCrop, build_transforms, resized_size

SMALL = DataConfig(
    train_scales=(48, 64, 80, 96),
    train_max_size=160,
    crop_resize_scales=(56, 72),
    crop_size=(32, 64),
    val_scale=96,
    val_max_size=160,
)


def _sample(boxes, labels, h=64, w=96):
    return {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32), format="XYXY", canvas_size=(h, w)),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def _denormalise(image):
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image * std + mean) * 255


@pytest.mark.parametrize(
    "hw,size,max_size,expected",
    [
        ((480, 640), 800, 1333, (800, 1066)),
        ((640, 480), 800, 1333, (1066, 800)),
        ((300, 1000), 800, 1333, (400, 1333)),  # longer side capped
        ((375, 500), 800, None, (800, 1066)),  # shorter side exact, no float truncation to 799
        ((64, 64), 128, 128, (128, 128)),
    ],
)
def test_resized_size_matches_official_arithmetic(hw, size, max_size, expected):
    assert resized_size(*hw, size, max_size) == expected


def test_val_resize_scales_image_and_boxes():
    image = Image.new("RGB", (96, 64), (128, 128, 128))
    out, target = build_transforms(DataConfig(val_scale=128, val_max_size=1333), "val")(
        image, _sample([[10, 20, 30, 40]], [3])
    )
    assert out.shape == (3, 128, 192) and out.dtype == torch.float32
    assert target["boxes"].canvas_size == (128, 192)
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), torch.tensor([[20.0, 40.0, 60.0, 80.0]]))
    assert target["labels"].tolist() == [3]
    # grey 128 normalised with ImageNet statistics
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected, atol=1e-4, rtol=0)


def test_flip_mirrors_a_known_box():
    flip = v2.Compose([v2.ToImage(), v2.RandomHorizontalFlip(p=1.0)])
    pixels = np.zeros((64, 96, 3), dtype=np.uint8)
    pixels[20:40, 10:30] = 255
    out, target = flip(Image.fromarray(pixels), _sample([[10, 20, 30, 40]], [1]))
    assert target["boxes"].tolist() == [[66.0, 20.0, 86.0, 40.0]]
    assert out[0, 20:40, 66:86].min() == 255 and out[0].sum() == 255 * 20 * 20


def test_train_pipeline_keeps_boxes_on_the_object():
    """Over many random draws (flip, resize, crop) the box stays on the red square and the output fits the contract."""
    pixels = np.full((64, 96, 3), 100, dtype=np.uint8)
    pixels[16:48, 40:72] = (255, 0, 0)
    image = Image.fromarray(pixels)
    transforms = build_transforms(SMALL, "train")
    torch.manual_seed(0)
    sizes, kept = set(), 0
    for _ in range(60):
        out, target = transforms(image, _sample([[40, 16, 72, 48]], [5]))
        h, w = out.shape[-2:]
        sizes.add((h, w))
        assert target["boxes"].canvas_size == (h, w)
        assert max(h, w) <= SMALL.train_max_size and out.dtype == torch.float32
        assert len(target["boxes"]) == len(target["labels"])
        if not len(target["boxes"]):
            continue  # cropped away entirely: allowed
        kept += 1
        assert target["labels"].tolist() == [5]
        x1, y1, x2, y2 = target["boxes"][0].tolist()
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        red = _denormalise(out)
        inner = red[:, int(y1) + 2 : int(y2) - 1, int(x1) + 2 : int(x2) - 1]
        if inner.numel():
            assert inner[0].min() > 200 and inner[1].max() < 60, (x1, y1, x2, y2)
        # just outside the box the image is grey, not red
        for yy, xx in ((y1 - 2, (x1 + x2) / 2), (y2 + 1, (x1 + x2) / 2), ((y1 + y2) / 2, x1 - 2), ((y1 + y2) / 2, x2 + 1)):
            if 0 <= yy < h and 0 <= xx < w:
                assert red[0, int(yy), int(xx)] < 160, (yy, xx, (x1, y1, x2, y2))
    assert kept >= 30
    assert len(sizes) > 3  # multi-scale really varies the size


def test_crop_drops_boxes_outside_it_with_their_labels():
    transforms = v2.Compose([v2.ToImage(), RandomSizeCrop(32, 32), v2.SanitizeBoundingBoxes()])
    image = Image.new("RGB", (64, 64))
    torch.manual_seed(1)
    seen = set()
    for _ in range(40):
        _, target = transforms(image, _sample([[0, 0, 10, 10], [54, 54, 64, 64]], [7, 9], h=64, w=64))
        boxes, labels = target["boxes"], target["labels"]
        assert target["boxes"].canvas_size == (32, 32)
        assert len(boxes) == len(labels) <= 1  # no 32 px window overlaps both corners
        for box, label in zip(boxes.tolist(), labels.tolist()):
            assert label == (7 if box[0] == 0 and box[1] == 0 else 9)
            seen.add(label)
    assert seen == {7, 9}


def test_crop_smaller_image_than_min_size_is_not_an_error():
    out = v2.Compose([v2.ToImage(), RandomSizeCrop(100, 200)])(Image.new("RGB", (40, 30)))
    assert out.shape == (3, 30, 40)


def test_bad_split_and_crop_parameters():
    with pytest.raises(ValueError, match="split"):
        build_transforms(SMALL, "test")
    with pytest.raises(ValueError, match="min_size <= max_size"):
        RandomSizeCrop(64, 32)


@pytest.mark.parametrize(
    "field,value",
    [("train_scales", ()), ("crop_resize_scales", (0, 64)), ("crop_size", (64, 32)), ("val_scale", -1), ("train_max_size", 1.5)],
)
def test_bad_scales_name_the_config_field(field, value):
    cfg = DataConfig(**{field: value})
    with pytest.raises(ValueError, match=f"data.{field}"):
        build_transforms(cfg, "train")
