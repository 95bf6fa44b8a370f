"""Recipes, overrides, batch planning and the CLI surface of the engine."""
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from dino.config import apply_overrides
from dino.engine.batching import plan_batches
from dino.engine.recipe import RECIPES_DIR, available_recipes, load_recipe, recipe_path
from dino.errors import UserError
from dino.engine.optim import build_optimizer, build_scheduler
from dino.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "total,procs,cap,expected",
    [
        (16, 1, 2, (2, 8)),  # official R50 recipe on one GPU: 2 images x 8 accumulation steps
        (16, 8, 2, (2, 1)),  # the official 8 GPUs
        (16, 16, 2, (1, 1)),
        (16, 2, 3, (2, 4)),  # 3 does not divide 8: the largest divisor below the cap
        (16, 4, None, (4, 1)),
    ],
)
def test_plan_batches_keeps_effective_batch(total, procs, cap, expected):
    plan = plan_batches(total, procs, cap)
    assert (plan.per_device, plan.accumulation) == expected
    assert plan.effective == total
    assert f"effective batch {total}" in plan.describe()


def test_plan_batches_rejects_unsplittable_total():
    with pytest.raises(ValueError, match="total_batch_size=16 cannot be split evenly over 3 processes"):
        plan_batches(16, 3, 2)


OFFICIAL = {  # recipe: (epochs, lr drop, feature levels, per-device cap)
    "dino_r50_4scale_12ep": (12, (11,), 4, 2),
    "dino_r50_4scale_24ep": (24, (20,), 4, 2),
    "dino_r50_4scale_36ep": (36, (30,), 4, 2),
    "dino_r50_5scale_12ep": (12, (11,), 5, 1),
    "dino_r50_5scale_24ep": (24, (20,), 5, 1),
    "dino_r50_5scale_36ep": (36, (30,), 5, 1),
    "dino_swinl_4scale_12ep": (12, (11,), 4, 2),
    "dino_swinl_4scale_36ep": (36, (30,), 4, 2),
    "dino_swinl_5scale_12ep": (12, (11,), 5, 1),
    "dino_swinl_5scale_36ep": (36, (30,), 5, 1),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_recipes_match_official_hyperparameters(name):
    cfg = load_recipe(name)
    epochs, drop, levels, cap = OFFICIAL[name]
    assert cfg.name == name
    assert (cfg.optim.epochs, cfg.optim.lr_drop_epochs, cfg.optim.lr_drop_factor) == (epochs, drop, 0.1)
    assert cfg.model.transformer.num_feature_levels == levels
    assert len(cfg.model.backbone.return_levels) == levels - 1
    assert (cfg.optim.lr, cfg.optim.lr_backbone, cfg.optim.weight_decay, cfg.optim.clip_max_norm) == (1e-4, 1e-5, 1e-4, 0.1)
    assert (cfg.optim.total_batch_size, cfg.optim.batch_size_per_device) == (16, cap)
    assert (cfg.train.seed, cfg.train.mixed_precision, cfg.train.ema) == (42, "no", False)
    assert (cfg.model.num_classes, cfg.data.dataset) == (91, "coco")
    assert cfg.model.transformer.num_queries == 900 and cfg.model.denoising.dn_number == 100
    assert cfg.model.denoising.box_noise_scale == 1.0
    assert cfg.model.backbone.gradient_checkpointing == name.startswith("dino_swinl")


def test_every_recipe_file_loads():
    names = available_recipes()
    assert set(OFFICIAL) | {"quickstart"} <= set(names)
    for name in names:
        # The official total batch, except the CPU quickstart's (smaller batches learn faster per image there).
        assert load_recipe(name).optim.total_batch_size == (8 if name == "quickstart" else 16)


def test_overrides_apply_with_types():
    cfg = load_recipe("quickstart", ["optim.lr=3e-4", "model.backbone.return_levels=2,3", "train.ema=true",
                                     "optim.batch_size_per_device=none", "data.root=/x/y"])
    assert cfg.optim.lr == 3e-4 and cfg.model.backbone.return_levels == (2, 3) and cfg.train.ema is True
    assert cfg.optim.batch_size_per_device is None and cfg.data.root == "/x/y"


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lrr=1", "no field 'lrr' in OptimConfig"),
        ("optimizer.lr=1", "no config section 'optimizer'"),
        ("optim.lr", "must look like section.field=value"),
        ("train.ema=maybe", "train.ema must be a boolean"),
    ],
)
def test_bad_override_names_the_problem(override, message):
    with pytest.raises(ValueError, match=message):
        load_recipe("quickstart", [override])


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.epochs=1.5", "optim.epochs must be an integer, got '1.5'"),
        ("optim.epochs=ten", "optim.epochs must be an integer, got 'ten'"),
        ("optim.epochs=true", "optim.epochs must be an integer, got 'true'"),
        ("optim.lr=fast", "optim.lr must be a number, got 'fast'"),
        ("optim.batch_size_per_device=2.5", "optim.batch_size_per_device must be an integer or none, got '2.5'"),
        ("data.crop_size=1,2,3", "data.crop_size must be a tuple of 2 integers (e.g. 1,2), got '1,2,3'"),
        ("optim.lr_drop_epochs=3,x", "optim.lr_drop_epochs must be a tuple of integers (e.g. 1,2,3), got '3,x'"),
        ("optim.lr_drop_epochs=3.5", "optim.lr_drop_epochs must be a tuple of integers (e.g. 1,2,3), got '3.5'"),
        ("model.backbone.timm_kwargs=384", "model.backbone.timm_kwargs must be a dict"),
    ],
)
def test_override_values_are_checked_against_the_declared_type(override, message):
    with pytest.raises(UserError) as err:
        load_recipe("quickstart", [override])
    assert str(err.value).startswith(f"override {override!r}: {message}")


@pytest.mark.parametrize(
    "override,field,expected",
    [
        ("optim.epochs=3", "epochs", 3),
        ("optim.lr=1", "lr", 1.0),  # an integer is a float
        ("optim.lr=inf", "lr", float("inf")),
        ("optim.lr_drop_epochs=4", "lr_drop_epochs", (4,)),
        ("optim.lr_drop_epochs=(2,4)", "lr_drop_epochs", (2, 4)),
        ("optim.lr_drop_epochs=[2,4]", "lr_drop_epochs", (2, 4)),
        ("optim.lr_drop_epochs=()", "lr_drop_epochs", ()),
        ("optim.batch_size_per_device=null", "batch_size_per_device", None),
        ("optim.batch_size_per_device=4", "batch_size_per_device", 4),
    ],
)
def test_override_accepted_forms(override, field, expected):
    value = getattr(load_recipe("quickstart", [override]).optim, field)
    assert value == expected and type(value) is type(expected)


def test_override_types_come_from_the_annotations_not_the_current_value():
    # The current value is None (an optional int); the old parser took any text for it.
    cfg = load_recipe("quickstart", ["train.max_steps=7", "model.backbone.pretrained=/w.pth",
                                     "model.backbone.timm_kwargs={'img_size': 384}", "data.crop_size=(384,600)"])
    assert cfg.train.max_steps == 7 and cfg.model.backbone.pretrained == "/w.pth"
    assert cfg.model.backbone.timm_kwargs == {"img_size": 384} and cfg.data.crop_size == (384, 600)
    with pytest.raises(UserError, match="train.max_steps must be an integer or none, got 'many'"):
        load_recipe("quickstart", ["train.max_steps=many"])


def test_override_of_a_literal_field_takes_only_its_values():
    @dataclasses.dataclass
    class Section:
        mode: typing.Literal["no", "bf16"] = "no"

    @dataclasses.dataclass
    class Cfg:
        sec: Section = dataclasses.field(default_factory=Section)

    assert apply_overrides(Cfg(), ["sec.mode=bf16"]).sec.mode == "bf16"
    with pytest.raises(UserError, match=r"^override 'sec.mode=fp8': sec.mode must be one of no, bf16, got 'fp8'$"):
        apply_overrides(Cfg(), ["sec.mode=fp8"])


def test_unknown_recipe_lists_available():
    with pytest.raises(UserError, match="no recipe named 'nope'; available: .*dino_r50_4scale_12ep"):
        load_recipe("nope")


def test_recipe_name_never_resolves_from_the_current_folder(tmp_path, monkeypatch):
    """A name is one of the project's recipes: a recipes/ folder in the cwd must not run code by name."""
    (tmp_path / "recipes").mkdir()
    evil = "raise SystemExit('recipes/evil.py of the current folder ran')\n"
    (tmp_path / "recipes" / "evil.py").write_text(evil)
    (tmp_path / "recipes" / "quickstart.py").write_text(evil)  # shadows a real name
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no recipe named 'evil'; available: .*quickstart"):
        recipe_path("evil")
    assert recipe_path("quickstart") == RECIPES_DIR / "quickstart.py"
    assert load_recipe("quickstart").name == "quickstart"
    # Given as a path, the user's own file is used.
    assert recipe_path("recipes/evil.py") == Path("recipes/evil.py")
    with pytest.raises(SystemExit, match="ran"):
        load_recipe("recipes/evil.py")


@pytest.mark.parametrize("spec", ["missing.py", "recipes/missing", "./nope.py", "sub/dir/x.py"])
def test_recipe_path_must_exist(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=f"recipe file {spec} does not exist"):
        recipe_path(spec)


@pytest.mark.parametrize("spec", ["", "_private", ".hidden", "quickstart.yaml"])
def test_recipe_name_that_is_not_a_recipe_lists_available(spec):
    with pytest.raises(UserError, match=f"no recipe named {spec!r}; available: "):
        recipe_path(spec)


def test_recipe_without_recipe_function_is_rejected(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ValueError, match=r"bad.py must define `def recipe\(\) -> Recipe:`"):
        load_recipe(str(bad))


def test_param_groups_and_step_schedule():
    import torch

    cfg = load_recipe(str(REPO / "tests" / "engine_tiny_recipe.py"), ["optim.lr_backbone=1e-5", "optim.epochs=3",
                                                                      "optim.lr_drop_epochs=2"])
    from dino import build_model

    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    groups = {g["name"]: g for g in opt.param_groups}
    backbone_ids = {id(p) for n, p in model.named_parameters() if "backbone" in n and p.requires_grad}
    assert {id(p) for p in groups["backbone"]["params"]} == backbone_ids
    assert groups["backbone"]["lr"] == 1e-5 and groups["default"]["lr"] == cfg.optim.lr
    assert all(g["weight_decay"] == cfg.optim.weight_decay for g in opt.param_groups)
    assert opt.defaults["fused"]  # CPU float parameters: the fused implementation
    sched = build_scheduler(opt, cfg.optim)
    lrs = []
    for _ in range(3):
        lrs.append(groups["default"]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4])
    with pytest.raises(ValueError, match="lr_drop_epochs"):
        cfg.optim.lr_drop_epochs = (5,)
        build_scheduler(torch.optim.AdamW(model.parameters()), cfg.optim)
    cfg.optim.lr_drop_epochs, cfg.optim.warmup_steps = (2,), -1
    with pytest.raises(UserError, match=r"optim.warmup_steps must be >= 0, got -1"):
        build_scheduler(torch.optim.AdamW(model.parameters()), cfg.optim)



def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def _help(entry, argv, capsys) -> tuple[int, str]:
    """``entry(argv)`` (a ``--help``): its exit status and what it printed. In this process: launch.py's own script is
    run by test_launch_reports_bad_override_clearly, so three more interpreter starts would test nothing more."""
    with pytest.raises(SystemExit) as exit_info:
        entry(argv)
    return exit_info.value.code, capsys.readouterr().out


def test_launch_and_cli_help_document_every_flag(capsys):
    from dino_cli import launch_main, main

    for entry, argv in ((launch_main, ["--help"]), (main, ["train", "--help"])):
        code, out = _help(entry, argv, capsys)
        assert code == 0
        for flag in ("--set", "--resume", "--resume-anyway", "--finetune-from", "--ignore-keys", "--print-recipe", "optim.lr ="):
            assert flag in out, (argv, flag)
    code, out = _help(main, ["eval", "--help"], capsys)
    assert code == 0 and "--checkpoint" in out and "--recipe" in out


def test_launch_reports_bad_override_clearly():
    out = _run("launch.py", "quickstart", "--set", "optim.nope=1")
    assert out.returncode == 2
    assert "launch.py: error: override 'optim.nope=1': no field 'nope' in OptimConfig" in out.stderr


def test_accelerate_launch_mixed_precision_flag_applies_when_the_recipe_says_no(monkeypatch):
    from dino.engine.setup import build_accelerator

    cfg = load_recipe("quickstart", ["train.tracker=none"])
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert build_accelerator(cfg).mixed_precision == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert build_accelerator(cfg).mixed_precision == "no"
    cfg.train.mixed_precision = "bf16"  # the recipe's own choice needs no flag
    assert build_accelerator(cfg).mixed_precision == "bf16"


def test_precision_source_is_logged_and_missing_tensorboard_warned(monkeypatch, caplog):
    import logging

    import dino.engine.setup
    from dino.engine.setup import build_accelerator

    cfg = load_recipe("quickstart", ["train.tracker=tensorboard"])
    monkeypatch.setattr(dino.engine.setup, "is_tensorboard_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with caplog.at_level(logging.INFO, logger="dino.engine"):
        accelerator = build_accelerator(cfg)
    assert accelerator.log_with == [] and accelerator.mixed_precision == "bf16"
    assert "train.tracker='tensorboard' but TensorBoard is not installed" in caplog.text
    assert "mixed precision: bf16 (from accelerate launch / accelerate config (the recipe says 'no'))" in caplog.text
    caplog.clear()
    cfg.train.mixed_precision = "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with caplog.at_level(logging.INFO, logger="dino.engine"):
        build_accelerator(cfg)
    assert "train.mixed_precision=bf16 overrides accelerate's mixed_precision=fp16" in caplog.text
    assert "mixed precision: bf16 (from the recipe's train.mixed_precision)" in caplog.text
