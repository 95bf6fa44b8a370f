"""Issue 26: every argument tried the wrong way gets one clear line, and `dino data check` reports every refusal that
training gives before its first step (the same functions run in both: dino.engine.preflight)."""
from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess

import pytest
import torch

import dino
import dino_cli
from dino.data import build_dataset
from dino.engine.batching import check_batch_fits, plan_batches
from dino.engine.recipe import load_recipe
from dino.engine.setup import fit_classes_to
from dino.errors import SharedUserError, UserError
from dino.models.levels import encoder_tokens, feature_strides, image_size_problem, smallest_square_side
from dino.weights import save_weights
from dino_export.deploy_model import check_canvas_fits
from tests.launching import REPO, TINY, free_port, launch_command, launch_env, two_processes
from tests.test_data_coco import ann, make_dataset


def _cli(capsys, *argv):
    rc = dino_cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _error_lines(err: str, prefix: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"{prefix}: error: ")]


# --- items 2 and 3: batch sizes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("total, per_device, field", [(0, None, "optim.total_batch_size"),
                                                      (-4, 2, "optim.total_batch_size"),
                                                      (4, 0, "optim.batch_size_per_device"),
                                                      (4, -1, "optim.batch_size_per_device")])
def test_zero_or_negative_batch_sizes_are_one_line(total, per_device, field):
    with pytest.raises(SharedUserError, match=rf"^{field} must be an integer >= 1"):
        plan_batches(total, 1, per_device)


def test_total_batch_larger_than_the_training_set_is_refused_with_per_device_set():
    plan = plan_batches(64, 1, 4)  # 4 per device x 16 accumulation steps
    with pytest.raises(SharedUserError, match=r"^optim.total_batch_size=64 is larger than the training set of "
                                              r"train.json \(8 image\(s\)\).*at most 8>$"):
        check_batch_fits(plan, 8, "train.json")
    check_batch_fits(plan_batches(8, 1, 4), 8, "train.json")  # 2 micro-batches x 4: exactly one step
    with pytest.raises(SharedUserError, match=r"^optim.total_batch_size=16 .* a multiple of 2>$"):
        check_batch_fits(plan_batches(16, 2, 2), 10, "train.json")  # 10 // 4 = 2 micro-batches, 4 needed


def test_dino_train_refuses_the_oversized_batch_naming_the_field(tmp_path, capsys):
    rc, _, err = _cli(capsys, "train", TINY, "--set", f"data.root={tmp_path / 'shapes'}",
                      f"train.output_dir={tmp_path / 'out'}", "optim.total_batch_size=64",
                      "optim.batch_size_per_device=4")
    assert rc == 2, err
    lines = _error_lines(err, "dino train")
    assert len(lines) == 1 and "optim.total_batch_size=64 is larger than the training set of" in lines[0]
    rc, _, err = _cli(capsys, "train", TINY, "--set", f"data.root={tmp_path / 'shapes'}",
                      f"train.output_dir={tmp_path / 'out'}", "optim.total_batch_size=0")
    assert rc == 2 and _error_lines(err, "dino train") == [
        "dino train: error: optim.total_batch_size must be an integer >= 1, got 0; set --set optim.total_batch_size=<N>"]
    assert "Traceback" not in err


def test_two_processes_print_the_unsplittable_batch_once(tmp_path):
    cmd = launch_command(*two_processes(free_port()),
                         overrides=(f"data.root={tmp_path / 'shapes'}", f"train.output_dir={tmp_path / 'out'}",
                                    "optim.total_batch_size=3", "optim.batch_size_per_device=none"))
    run = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if "launch.py: error: " in line]
    assert lines == ["launch.py: error: optim.total_batch_size=3 cannot be split evenly over 2 processes; "
                     "set --set optim.total_batch_size=<a multiple of 2>"], run.stderr[-3000:]
    assert "dino/engine/batching.py" not in run.stderr, run.stderr[-3000:]  # no traceback through our code


# --- item 6: trained weights honour the umask ------------------------------------------------------------------

def test_saved_weights_have_the_mode_of_any_new_file(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = tmp_path / "model.safetensors"
    save_weights({"w": torch.zeros(2)}, path)
    plain = tmp_path / "plain"
    plain.write_text("")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask


# --- item 4: dino export output paths, refused before any work --------------------------------------------------

@pytest.mark.parametrize("target, name", [("onnx", "m.onnx"), ("aoti", "m.pt2")])
def test_export_output_paths_are_refused_before_any_work(tmp_path, capsys, target, name):
    missing = tmp_path / "no.safetensors"  # refused first: the output is checked before the checkpoint is read
    (tmp_path / "base.onnx").write_text("a file")
    (tmp_path / "adir").mkdir()
    base = ["export", target, "--recipe", "dino_quickstart", "--checkpoint", missing, "--image-size", "64", "64"]
    if target == "aoti":
        base += ["--device", "cpu"]
    cases = {
        tmp_path / "base.onnx" / name: f"--output {tmp_path / 'base.onnx' / name}: {tmp_path / 'base.onnx'} is a "
                                       "file, not a folder; choose another --output",
        tmp_path / "adir": f"--output {tmp_path / 'adir'} is a folder; give the file to write, e.g. --output "
                           f"{tmp_path / 'adir' / ('model.onnx' if target == 'onnx' else 'model.pt2')}",
    }
    for output, message in cases.items():
        rc, _, err = _cli(capsys, *base, "--output", output)
        assert rc == 2 and err == f"dino export {target}: error: {message}\n"
    assert (tmp_path / "base.onnx").read_text() == "a file"


def test_export_output_that_is_the_checkpoint_is_refused(tmp_path, capsys):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"weights")
    rc, _, err = _cli(capsys, "export", "onnx", "--recipe", "dino_quickstart", "--checkpoint", checkpoint,
                      "--output", checkpoint)
    assert rc == 2 and "is also this command's input: writing it would replace that input" in err
    assert checkpoint.read_bytes() == b"weights"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_export_into_a_read_only_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        rc, _, err = _cli(capsys, "export", "onnx", "--recipe", "dino_quickstart", "--checkpoint",
                          tmp_path / "no.safetensors", "--output", folder / "m.onnx")
    finally:
        folder.chmod(0o755)
    assert rc == 2 and f"cannot be written: {folder} is not writable (Permission denied)" in err


# --- item 5: the smallest export size comes from the model's levels and queries ---------------------------------

def _meta_model(name: str, **transformer):
    from dino.model_loading import without_pretrained_backbone
    from dino.presets import get_preset

    cfg = without_pretrained_backbone(get_preset(name))
    for key, value in transformer.items():
        setattr(cfg.transformer, key, value)
    with torch.device("meta"):
        return dino.build_model(cfg)


def test_encoder_tokens_match_the_feature_maps_of_odd_sizes():
    torch.manual_seed(0)
    cfg = load_recipe(TINY).model
    cfg.num_classes = 4
    model = dino.build_model(cfg).eval()
    for height, width in ((33, 47), (65, 31), (17, 90)):
        with torch.no_grad():
            srcs, _, _ = model._features(torch.zeros(1, 3, height, width), torch.zeros(1, height, width, dtype=bool))
        assert encoder_tokens(feature_strides(model), height, width) == sum(s.shape[-2] * s.shape[-1] for s in srcs)


def test_export_size_limit_is_the_models_own():
    quick = _meta_model("dino_quickstart")  # strides 4, 8, 16; 30 queries
    check_canvas_fits(quick, (33, 47))  # was refused: "below 64 px: the stride-64 feature level would be empty"
    assert feature_strides(quick) == [4, 8, 16] and smallest_square_side([4, 8, 16], 30) == 17
    with pytest.raises(UserError, match=r"^--image-size 8 8: 8x8 px gives the model's feature levels \(strides 4, 8, "
                                        r"16\) 6 encoder tokens, fewer than its 30 queries"):
        check_canvas_fits(quick, (8, 8))
    r50 = _meta_model("dino_r50_4scale")
    assert "strides 8, 16, 32, 64) 44 encoder tokens, fewer than its 900 queries" in image_size_problem(r50, 33, 47)
    assert image_size_problem(r50, 201, 201) is None and image_size_problem(r50, 200, 200) is not None


# --- items 1 and 9: dino data check reports what training refuses, and says what training says -------------------

def _coco_root(tmp_path, category_ids=(1, 7, 1000), boxes_on_first=2):
    """8 images of 64x48 with boxes of the given category ids (the first image has ``boxes_on_first`` boxes)."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 48} for i in range(1, 9)]
    anns, aid = [], 0
    for image in images:
        for k in range(boxes_on_first if image["id"] == 1 else 1):
            aid += 1
            anns.append(ann(aid, [1 + k % 30, 1 + k % 20, 10, 10], category_id=category_ids[aid % len(category_ids)],
                            image_id=image["id"]))
    make_dataset(tmp_path, images=images, annotations=anns,
                 categories=[{"id": c, "name": f"c{c}"} for c in category_ids])
    return [f"data.dataset=coco", f"data.root={tmp_path}", "data.train_images=img", "data.val_images=img",
            "data.train_annotations=instances.json", "data.val_annotations=instances.json"]


# Each refusal training gives before its first step (the tiny recipe on 8 shapes images): the overrides and the
# start of its one-line message.
REFUSALS = {
    "epochs": (["optim.epochs=0"], "optim.epochs must be >= 1, got 0"),
    "warm-up": (["optim.warmup_steps=-1"], "optim.warmup_steps must be >= 0, got -1"),
    "lr drop": (["optim.lr_drop_epochs=5"], "optim.lr_drop_epochs=(5,): 5 outside the epochs 1..2"),
    "keep": (["train.keep_checkpoints=0"], "train.keep_checkpoints must be an integer >= 1"),
    "timeout": (["train.process_group_timeout_s=0"], "train.process_group_timeout_s must be positive, got 0"),
    "total 0": (["optim.total_batch_size=0"], "optim.total_batch_size must be an integer >= 1, got 0"),
    "per device 0": (["optim.batch_size_per_device=0"], "optim.batch_size_per_device must be an integer >= 1"),
    "batch > set": (["optim.total_batch_size=64", "optim.batch_size_per_device=4"],
                    "optim.total_batch_size=64 is larger than the training set of"),
    "batch > set, no cap": (["optim.total_batch_size=16", "optim.batch_size_per_device=none"],
                            "optim.total_batch_size=16 is larger than the training set of"),
    "classes": (["model.num_classes=2"], "model.num_classes=2 is smaller than the 4 classes of"),
    "label book": (["model.denoising.labelbook_size=2"], "model.denoising.labelbook_size=2 is smaller than"),
    "eval batch": (["train.eval_batch_size=0"], "train.eval_batch_size must be >= 1, got 0"),
    "model": (["model.transformer.num_feature_levels=1"], "transformer.num_feature_levels (1) < backbone levels"),
    "lr": (["optim.lr=-1"], "optim.lr must be a finite number >= 0, got -1.0"),
    "seed": (["train.seed=-1"], "train.seed must be in [0, 2**32), got -1"),
    "scales": (["data.train_scales=0"], "data.train_scales must be a non-empty list of positive ints, got (0,)"),
    "workers": (["data.num_workers=-1"], "data.num_workers must be >= 0"),
    "num_select": (["model.num_select=0"], "model.num_select must be >= 1"),
    "denoising": (["model.denoising.label_noise_ratio=2"], "model.denoising: dn_number must be >= 0"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_every_refusal_before_step_one_is_reported_by_data_check(tmp_path, capsys, case):
    overrides, message = REFUSALS[case]
    common = [f"data.root={tmp_path / 'shapes'}", f"train.output_dir={tmp_path / 'out'}", *overrides]
    rc, _, err = _cli(capsys, "train", TINY, "--set", *common)
    lines = _error_lines(err, "dino train")
    assert rc == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "out" / "checkpoints").exists()  # refused before the first step
    rc, out, err = _cli(capsys, "data", "check", "--recipe", TINY, "--set", *common)
    assert rc == 1, out + err
    refusal = lines[0][len("dino train: error: "):]
    assert any(line.startswith("  train: training setup *: ") and line.endswith(refusal)
               for line in out.splitlines()), out


def test_data_check_refuses_what_training_refuses_for_category_ids_1_7_1000(tmp_path, capsys):
    data = _coco_root(tmp_path)
    rc, _, err = _cli(capsys, "train", TINY, "--set", *data, f"train.output_dir={tmp_path / 'out'}",
                      "model.num_classes=4")
    assert rc == 2 and "model.num_classes=4 is smaller than the 1001 classes of" in err
    rc, out, _ = _cli(capsys, "data", "check", "--recipe", TINY, "--set", *data, "model.num_classes=4")
    assert rc == 1 and "model.num_classes=4 is smaller than the 1001 classes of" in out  # was: exit 0


def test_data_check_and_training_say_what_the_data_implies(tmp_path, capsys, caplog):
    data = _coco_root(tmp_path, boxes_on_first=25)  # the tiny recipe has 20 queries
    data.append("model.num_classes=none")  # sized from the data, as the run
    rc, out, _ = _cli(capsys, "data", "check", "--recipe", TINY, "--set", *data)
    assert rc == 0, out
    assert ("category ids 1, 7, 1000 make a 1001-class head (labels are category ids: max id + 1) for 3 "
            "categories; 998 outputs belong to no category") in out
    assert ("1 image(s) have more boxes than the model's 20 queries (at most 25, image id 1): the model can find at "
            "most 20 objects per image") in out
    cfg = load_recipe(TINY, data)
    with caplog.at_level(logging.INFO, logger="dino.engine"):
        fit_classes_to(cfg, build_dataset(cfg.data, "train"))  # what training runs at its start
    assert cfg.model.num_classes == 1001
    said = [r.getMessage() for r in caplog.records]
    assert any("make a 1001-class head" in m for m in said) and any("more boxes than the model's 20" in m for m in said)


def test_data_check_reports_images_too_small_for_the_queries(tmp_path, capsys):
    rc, out, _ = _cli(capsys, "data", "check", "--recipe", TINY, "--set", f"data.root={tmp_path / 'shapes'}",
                      "model.transformer.num_queries=200")
    assert rc == 1
    # No training input can fit 200 queries: training refuses the setup (listed once), so only val lists its images.
    assert "no training input fits the model: the largest (data.train_scales up to 64" in out
    assert [line.split() for line in out.splitlines() if line.startswith("image too small")] == [
        ["image", "too", "small", "for", "the", "model", "*", "0", "5"]]
    assert "84 encoder tokens, fewer than its 200 queries" in out


# --- the sweep: each case fixed here (docs/user_errors.md lists every case tried) --------------------------------

def test_recipe_that_is_a_folder_a_text_file_or_does_not_parse(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("optim.lr = 1")
    (tmp_path / "broken.py").write_text("def recipe(:\n")
    cases = {
        tmp_path: f"recipe file {tmp_path} is a folder; give a recipe's .py file",
        tmp_path / "notes.txt": f"recipe file {tmp_path / 'notes.txt'} is not a Python file (.py); a recipe is a .py "
                                "file defining `def recipe() -> Recipe:`",  # was: AttributeError traceback
        tmp_path / "broken.py": f"recipe file {tmp_path / 'broken.py'}, line 1: invalid syntax: 'def recipe(:'",
    }
    for recipe, message in cases.items():
        rc, _, err = _cli(capsys, "train", recipe)
        assert rc == 2 and err == f"dino train: error: {message}\n"


@pytest.mark.parametrize("field, value, message", [
    ("optim.lr", -1, "optim.lr must be a finite number >= 0, got -1.0"),  # was: torch's ValueError traceback
    ("optim.lr_backbone", -1, "optim.lr_backbone must be a finite number >= 0, got -1.0"),  # was: trained
    ("optim.weight_decay", -1, "optim.weight_decay must be a finite number >= 0, got -1.0"),
    ("optim.lr_drop_factor", 0, "optim.lr_drop_factor must be a finite number > 0"),
    ("train.max_steps", -1, "train.max_steps must be >= 1 (none: no limit), got -1"),  # was: untrained weights
    ("train.max_steps_per_epoch", 0, "train.max_steps_per_epoch must be >= 1 (none: whole epochs), got 0"),
    ("train.checkpoint_every_steps", -1, "train.checkpoint_every_steps must be >= 0"),  # was: every step
    ("train.eval_every_epochs", -1, "train.eval_every_epochs must be >= 0"),
    ("train.log_every_steps", 0, "train.log_every_steps must be >= 1"),
    ("train.ema_decay", 2, "train.ema_decay must be in [0, 1]"),
])
def test_run_settings_out_of_range_are_refused_before_anything_is_built(field, value, message):
    from dino.engine.optim import check_schedule
    from dino.engine.setup import check_train_config

    cfg = load_recipe(TINY, [f"{field}={value}"])
    with pytest.raises(UserError, match="^" + re.escape(message)):
        check_schedule(cfg.optim)
        check_train_config(cfg)


@pytest.mark.parametrize("override, message", [
    ("model.transformer.nheads=0", "model.transformer.nheads must be >= 1, got 0"),  # was: ZeroDivisionError
    ("model.transformer.num_queries=0", "model.transformer.num_queries must be >= 1, got 0"),
    ("model.transformer.hidden_dim=33", "model.transformer.hidden_dim must be a multiple of 32"),  # was: ValueError
    ("model.backbone.return_levels=0,9", "model.backbone.return_levels must be indices in 0..3"),
])
def test_model_settings_are_one_line(override, message):
    cfg = load_recipe(TINY, [override])
    with torch.device("meta"), pytest.raises(UserError, match=f"^{message}"):
        dino.build_model(cfg.model)


def test_backbone_weights_file_missing_is_one_line(tmp_path):
    cfg = load_recipe(TINY, [f"model.backbone.pretrained={tmp_path / 'nope.pth'}"])
    with pytest.raises(UserError, match=r"^model.backbone.pretrained: no such file"):  # was: FileNotFoundError
        dino.build_model(cfg.model)


def test_shapes_root_that_cannot_be_written_is_one_line(tmp_path):
    from dino.data import generate_shapes_dataset

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match=r"^data.root .*: the shapes dataset cannot be written there"):
        generate_shapes_dataset(blocker / "sub" / "shapes", 2, 2, 32)  # was: a FileExistsError traceback
    assert blocker.read_text() == ""


def test_a_text_file_given_as_a_pth_checkpoint(tmp_path):
    from dino.weights import load_pth_state_dict

    (tmp_path / "notes.pth").write_text("hello")
    with pytest.raises(UserError, match=r"notes.pth' is not a PyTorch checkpoint \(.pth\)"):  # was: "...: 101."
        load_pth_state_dict(tmp_path / "notes.pth")


def test_convert_output_paths_and_another_models_pth(tmp_path, capsys):
    source = tmp_path / "other.pth"
    torch.save({"model": {"a": torch.zeros(1)}}, source)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    cases = {
        tmp_path / "adir": f"output {tmp_path / 'adir'} is a folder; give the file to write, e.g. output "
                           f"{tmp_path / 'adir' / 'model.safetensors'}",
        tmp_path / "afile" / "m.safetensors": f"output {tmp_path / 'afile' / 'm.safetensors'}: {tmp_path / 'afile'} "
                                              "is a file, not a folder; choose another output",
        source: f"output {source} is also this command's input: writing it would replace that input; choose "
                "another output",
        tmp_path / "m.safetensors": f"{source}: not a DINO checkpoint: no 'transformer.*' or 'backbone.0.*' keys",
    }
    for output, message in cases.items():
        rc, _, err = _cli(capsys, "convert-official", source, output)
        assert rc == 2 and err.startswith(f"dino convert-official: error: {message}"), err
    assert torch.load(source)["model"]["a"].shape == (1,)  # the input is intact


def test_data_check_counts_are_checked_and_errors_name_the_subcommand(capsys):
    for flag, value, low in (("--workers", "0", 1), ("--max-listed", "-1", 0), ("--num-processes", "0", 1)):
        rc, _, err = _cli(capsys, "data", "check", "--recipe", TINY, flag, value)
        assert rc == 2 and err == f"dino data check: error: {flag} must be >= {low}, got {value}\n"


@pytest.mark.parametrize("target", ["onnx", "aoti"])
def test_export_max_batch_below_one_is_one_line(tmp_path, capsys, target):
    rc, _, err = _cli(capsys, "export", target, "--recipe", "dino_quickstart", "--checkpoint",
                      tmp_path / "model.safetensors", "--image-size", "64", "64", "--output", tmp_path / "m.out",
                      "--dynamic-batch", "--max-batch", "0", *(["--device", "cpu"] if target == "aoti" else []))
    assert rc == 2 and err == f"dino export {target}: error: --max-batch must be >= 1, got 0\n"  # was: AssertionError


def test_trt_onnx_that_is_a_folder(tmp_path, capsys):
    rc, _, err = _cli(capsys, "export", "trt", "--onnx", tmp_path)
    assert rc == 2 and err == f"dino export trt: error: ONNX file {tmp_path} is a folder; give the .onnx file\n"


def test_predict_output_that_cannot_be_created_is_one_line(tmp_path, capsys):
    from PIL import Image

    checkpoint = tmp_path / "model.safetensors"
    cfg = load_recipe(TINY).model
    save_weights(dino.build_model(cfg).state_dict(), checkpoint)
    Image.new("RGB", (64, 64), "white").save(tmp_path / "img.png")
    (tmp_path / "afile").write_text("x")
    rc, _, err = _cli(capsys, "predict", tmp_path / "img.png", "--recipe", TINY, "--checkpoint", checkpoint,
                      "--device", "cpu", "--output", tmp_path / "afile" / "out")  # was: a NotADirectoryError traceback
    assert rc == 2 and err.endswith(f"dino predict: error: --output {tmp_path / 'afile' / 'out'}: {tmp_path / 'afile'} "
                                    "is a file, not a folder; choose another --output\n"), err


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux's /sys, which no user (root included) writes")
def test_export_output_on_an_unwritable_file_system_is_refused_before_any_work(tmp_path, capsys):
    rc, _, err = _cli(capsys, "export", "onnx", "--recipe", "dino_quickstart", "--checkpoint", tmp_path / "no.safetensors",
                      "--output", "/sys/dino_sweep/m.onnx")
    assert rc == 2 and err.startswith("dino export onnx: error: --output /sys/dino_sweep/m.onnx cannot be written: /sys "
                                      "is not writable ("), err


def test_more_queries_than_any_training_input_has_tokens_is_one_line(tmp_path, capsys):
    """num_queries=1000000 exhausted the memory (1 TB for the queries' attention) before any check; now training and
    dino data check refuse it in the same line, before a step."""
    root, out = tmp_path / "shapes", tmp_path / "out"
    overrides = [f"data.root={root}", f"train.output_dir={out}", "model.transformer.num_queries=1000000"]
    rc, _, err = _cli(capsys, "train", TINY, "--set", *overrides)
    message = ("no training input fits the model: the largest (data.train_scales up to 64, data.train_max_size=64), "
               "64x64 px gives the model's feature levels (strides 8, 16, 32) 84 encoder tokens, fewer than its "
               "1000000 queries (model.transformer.num_queries), which are chosen among them; the model needs at "
               "least ")
    assert rc == 2 and err.startswith(f"dino train: error: {message}") and len(err.splitlines()) == 1, err
    assert not (out / "checkpoints").exists()
    rc, out_text, _ = _cli(capsys, "data", "check", "--recipe", TINY, "--set", *overrides[:1], *overrides[2:])
    assert rc == 1 and message in out_text
