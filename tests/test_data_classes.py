"""Fitting the model's class count to a dataset: num_classes and the denoising label book from the annotations."""
import json
import logging

import pytest

from dino.config import DenoisingConfig, ModelConfig
from dino.data import fit_num_classes, read_categories
from dino.errors import UserError
from dino.presets import get_preset


def test_unset_num_classes_and_label_book_come_from_the_dataset(tmp_path):
    path = tmp_path / "instances.json"
    categories = [{"id": 3, "name": "c"}, {"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.png", "width": 8, "height": 8}],
                                "annotations": [], "categories": categories}))
    num_classes, cats = read_categories(path)
    assert (num_classes, [c["id"] for c in cats]) == (4, [1, 2, 3])
    cfg = ModelConfig()
    assert (cfg.num_classes, cfg.denoising.labelbook_size) == (None, None)  # the defaults mean "from the dataset"
    assert fit_num_classes(cfg, num_classes, str(path)) is cfg
    assert (cfg.num_classes, cfg.denoising.labelbook_size) == (4, 4)


def test_label_book_is_sized_to_a_set_num_classes():
    cfg = fit_num_classes(ModelConfig(num_classes=10), 4)
    assert (cfg.num_classes, cfg.denoising.labelbook_size) == (10, 10)
    cfg = fit_num_classes(ModelConfig(denoising=DenoisingConfig(labelbook_size=20)), 4)
    assert (cfg.num_classes, cfg.denoising.labelbook_size) == (4, 20)  # a larger book is kept (official: 91 + 1 rows)


def test_official_coco_preset_on_coco_is_unchanged(caplog):
    cfg = get_preset("dino_r50_4scale")
    with caplog.at_level(logging.WARNING, logger="dino.data"):
        fit_num_classes(cfg, 91, "instances_train2017.json")
    assert (cfg.num_classes, cfg.denoising.labelbook_size) == (91, 91) and not caplog.records


def test_head_larger_than_the_dataset_is_kept_but_logged(caplog):
    cfg = get_preset("dino_r50_4scale")
    with caplog.at_level(logging.WARNING, logger="dino.data"):
        fit_num_classes(cfg, 6, "mine.json")
    assert cfg.num_classes == 91
    assert "model.num_classes=91 is set by the recipe; mine.json needs only 6" in caplog.text
    assert "model.num_classes=None" in caplog.text


def test_num_classes_smaller_than_the_dataset_names_the_setting():
    with pytest.raises(UserError, match=r"model.num_classes=3 is smaller than the 10 classes of mine.json "
                                        r"\(labels are category ids: max id 9 \+ 1\); set model.num_classes=10"):
        fit_num_classes(ModelConfig(num_classes=3), 10, "mine.json")


def test_label_book_smaller_than_num_classes_names_both_numbers_and_the_setting():
    cfg = ModelConfig(denoising=DenoisingConfig(labelbook_size=5))
    with pytest.raises(UserError, match=r"model.denoising.labelbook_size=5 is smaller than model.num_classes=8: .*"
                                        r"set model.denoising.labelbook_size=8"):
        fit_num_classes(cfg, 8)
