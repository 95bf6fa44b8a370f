"""Issue 35 item 8: a recipe file runs as Python with the user's rights (by design, as detectron2/mmdetection
configs), and every command that takes a recipe says so in its --help, as the README does."""
from __future__ import annotations

from pathlib import Path

import pytest

from dino.engine.recipe import RECIPE_RUNS_AS_PYTHON
from dino_cli import main

COMMANDS = [["train"], ["eval"], ["data", "check"], ["predict"], ["export", "onnx"], ["export", "trt"],
            ["export", "aoti"], ["export", "openvino"], ["bench"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_taking_a_recipe_says_it_runs_as_python(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert "recipe" in text and RECIPE_RUNS_AS_PYTHON in text


def test_the_readme_says_it_where_recipes_are_explained():
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "A recipe file runs as Python with your rights" in readme
