"""``python -m dino.quickstart`` end to end at tiny settings (a few seconds on a CPU)."""
import json

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
