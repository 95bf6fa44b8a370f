"""Which recipe differences refuse a resume (dino.engine.resume.recipe_differences): no training needed."""
from dino.config import Recipe
from dino.engine.resume import recipe_differences
from dino.engine.setup import resolved_recipe


def test_a_field_newer_than_the_checkpoint_at_its_default_is_no_difference():
    # A checkpoint written before data.shapes_val_image_size existed: the field is absent from its recipe. Resuming
    # it with the default must go on (it stopped `make quickstart` from resuming an interrupted run).
    current = resolved_recipe(Recipe())
    saved = {k: v for k, v in current.items() if k != "data.shapes_val_image_size"}
    assert recipe_differences(saved, current) == {}


def test_a_new_field_set_away_from_its_default_and_a_changed_field_are_differences():
    current = resolved_recipe(Recipe())
    saved = {k: v for k, v in current.items() if k != "data.shapes_val_image_size"}
    changed = {**current, "data.shapes_val_image_size": [40, 64], "optim.lr": current["optim.lr"] * 2}
    differences = recipe_differences(saved, changed)
    assert set(differences) == {"data.shapes_val_image_size", "optim.lr"}
    assert differences["optim.lr"] == (current["optim.lr"], current["optim.lr"] * 2)


def test_a_field_the_current_code_lacks_is_a_difference():
    current = resolved_recipe(Recipe())
    assert set(recipe_differences({**current, "model.removed_field": 1}, current)) == {"model.removed_field"}
