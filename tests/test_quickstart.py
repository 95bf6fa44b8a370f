"""``python -m dino.quickstart`` end to end at tiny settings (a few seconds on a CPU)."""
import json
import logging

from dino.engine import train as engine_train
from dino.engine.checkpoint import checkpoint_dirs
from dino.quickstart import main

# A model, dataset and schedule small enough for a test; the recipe's evaluation path is unchanged.
TINY = [
    "model.transformer.hidden_dim=32", "model.transformer.nheads=2", "model.transformer.enc_layers=1",
    "model.transformer.dec_layers=1", "model.transformer.dim_feedforward=32", "model.transformer.num_queries=10",
    "model.num_select=10", "model.denoising.dn_number=4", "data.shapes_train_images=4", "data.shapes_val_images=3",
    "optim.epochs=1", "optim.lr_drop_epochs=1", "optim.total_batch_size=2",
]


def test_quickstart_with_evaluation_off_evaluates_the_final_weights(tmp_path, capsys):
    # train.eval_every_epochs=0 used to crash on the missing training-time evaluation (None["AP"]).
    argv = ["--set", *TINY, f"data.root={tmp_path / 'shapes'}", f"train.output_dir={tmp_path / 'out'}",
            "train.eval_every_epochs=0"]
    code = main(argv)
    captured = capsys.readouterr()
    assert "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]" in captured.out
    assert "on 3 val images" in captured.out
    stats = json.loads((tmp_path / "out" / "eval" / "final" / "results.json").read_text())
    assert stats["num_images"] == 3
    assert (tmp_path / "out" / "model.safetensors").is_file()
    # One epoch of a 32-wide model cannot reach the bar: the exit status says so.
    assert stats["AP50"] < 0.5
    assert code == 1
    assert f"AP50 {stats['AP50']:.3f} is below 0.5" in captured.err


def test_rerun_resumes_an_interrupted_quickstart_and_does_not_retrain_a_finished_one(tmp_path, capsys, monkeypatch,
                                                                                   caplog):
    out = tmp_path / "out"
    argv = ["--set", *TINY, "optim.epochs=2", "optim.lr_drop_epochs=2", f"data.root={tmp_path / 'shapes'}",
            f"train.output_dir={out}", "--min-ap50", "0"]

    def ctrl_c_after_the_first_epoch(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_train, "_log_epoch", ctrl_c_after_the_first_epoch)  # after epoch 1's checkpoint
    assert main(argv) == 130
    err = capsys.readouterr().err
    first = out / "checkpoints" / "step_00000002_end"  # 4 images, batch 2: 2 steps per epoch
    assert err.endswith(f"quickstart: interrupted; last checkpoint: {first} (step 2, after epoch 1); rerun the same "
                        "command to resume from it\n")
    monkeypatch.undo()

    with caplog.at_level(logging.INFO, logger="dino.engine"):
        assert main(argv) == 0
    assert f"resumed from {first}: epoch 2, batch 0, step 2" in caplog.text
    assert [p.name for p in checkpoint_dirs(out)] == ["step_00000002_end", "step_00000004_end"]  # not pruned
    weights = (out / "model.safetensors").read_bytes()
    capsys.readouterr()

    assert main(argv) == 0  # finished: evaluated again, not retrained
    captured = capsys.readouterr()
    assert (f"quickstart: already finished: {out}, epoch 2/2 ({out / 'checkpoints' / 'step_00000004_end'}); to train "
            "again use a new train.output_dir or --set train.auto_resume=false") in captured.out
    assert "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]" in captured.out
    assert (out / "model.safetensors").read_bytes() == weights
    assert [p.name for p in checkpoint_dirs(out)] == ["step_00000002_end", "step_00000004_end"]

    # Training longer: a changed recipe is refused with the flags the quickstart has, then continued with them.
    longer = [*argv, "--set", "optim.epochs=3"]
    assert main(longer) == 2
    assert capsys.readouterr().err == (
        f"python -m dino.quickstart: error: {out / 'checkpoints' / 'step_00000004_end'} was trained with a different "
        "recipe (optim.epochs: 2 -> 3); pass --resume-anyway to continue it with the new values, or start afresh in "
        "another train.output_dir (or with --set train.auto_resume=false)\n")
    assert main([*longer, "--resume-anyway"]) == 0
    assert [p.name for p in checkpoint_dirs(out)] == ["step_00000004_end", "step_00000006_end"]


def test_quickstart_user_error_is_one_line(tmp_path, capsys):
    assert main(["--set", "optim.epochs=ten"]) == 2
    assert capsys.readouterr().err == ("python -m dino.quickstart: error: override 'optim.epochs=ten': optim.epochs "
                                       "must be an integer, got 'ten'\n")
