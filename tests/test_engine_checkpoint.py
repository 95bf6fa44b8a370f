"""Checkpoint folders and weight files: durable writes, crash safety at every step, retention."""
import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import dino.durable
import dino.engine.checkpoint as checkpoint
import dino.engine.checkpointer as checkpointer
from dino.engine.checkpoint import checkpoint_dirs, latest_checkpoint, read_progress, save_training_state
from dino.errors import UserError
from dino.weights import save_weights


class FakeAccelerator:
    """The part of Accelerator that save_training_state uses, in one process."""

    is_main_process = True

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "random_states_0.pkl").write_bytes(b"state")


def _save(out, step, value, keep=2):
    return save_training_state(FakeAccelerator(), out, {"epoch": 0, "batches_in_epoch": 0, "global_step": step, "value": value},
                               {"model.safetensors": {"w": torch.full((2,), float(value))}}, keep=keep)


def _loadable(out):
    """(step, value) of the checkpoint a resume would load, after checking it is complete."""
    ckpt = latest_checkpoint(out)
    progress = read_progress(ckpt)
    weights = load_file(str(ckpt / "model.safetensors"))
    assert (ckpt / "random_states_0.pkl").read_bytes() == b"state"
    assert torch.equal(weights["w"], torch.full((2,), float(progress["value"])))
    return progress["global_step"], progress["value"]


class Crash(BaseException):
    pass


@pytest.mark.parametrize("resave", [False, True], ids=["new_step", "same_step_again"])
def test_a_crash_between_any_two_steps_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, resave):
    # Every file-system step of a save (fsyncs, renames, deletes) is interrupted in turn; after each simulated kill
    # the checkpoint a resume picks is complete, and it is the old one or the new one.
    real = {"replace": os.replace, "rmtree": checkpoint.shutil.rmtree, "fsync": os.fsync}
    crash_at = 1
    while True:
        out = tmp_path / f"run{crash_at}"
        _save(out, 3, 3, keep=1)
        calls = [0]

        def step(name, *args, **kwargs):
            calls[0] += 1
            if calls[0] == crash_at:
                raise Crash(name)
            return real[name](*args, **kwargs)

        monkeypatch.setattr(os, "replace", lambda *a, **k: step("replace", *a, **k))
        monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda *a, **k: step("rmtree", *a, **k))
        monkeypatch.setattr(os, "fsync", lambda *a, **k: step("fsync", *a, **k))
        try:
            _save(out, 3 if resave else 4, 30, keep=1)
            crashed = False
        except Crash:
            crashed = True
        finally:
            monkeypatch.undo()
        assert _loadable(out) in ({(3, 3), (3, 30)} if resave else {(3, 3), (4, 30)}), f"crash at step {crash_at}"
        if not crashed:
            break
        _save(out, 5, 5, keep=1)  # the next save cleans up after the crash
        assert _loadable(out) == (5, 5)
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000005"], f"crash at step {crash_at}"
        crash_at += 1
    assert crash_at > 10  # every fsync, rename and delete was interrupted once
    assert _loadable(out) == ((3, 30) if resave else (4, 30))


def test_writes_fsync_file_and_folder_around_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or real_replace(a, b))
    save_weights({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    (_, tmp), rename, (_, folder) = events
    assert rename == ("replace", tmp, str(tmp_path / "model.safetensors")) and folder == str(tmp_path)

    events.clear()
    dino.durable.write_json({"a": 1}, tmp_path / "sub" / "x.json")
    assert events == [("fsync", str(tmp_path / "sub" / ".x.json.tmp")),
                      ("replace", str(tmp_path / "sub" / ".x.json.tmp"), str(tmp_path / "sub" / "x.json")),
                      ("fsync", str(tmp_path / "sub"))]

    events.clear()
    _save(tmp_path / "out", 1, 1)
    final = str(tmp_path / "out" / "checkpoints" / "step_00000001")
    tmp = str(tmp_path / "out" / "checkpoints" / ".tmp-step_00000001")
    at = events.index(("replace", tmp, final))
    synced_before = {e[1] for e in events[:at] if e[0] == "fsync"}
    assert {tmp, f"{tmp}/progress.json", f"{tmp}/model.safetensors", f"{tmp}/random_states_0.pkl"} <= synced_before
    assert events[at + 1] == ("fsync", str(tmp_path / "out" / "checkpoints"))


def test_retention_keeps_the_newest_and_rejects_zero(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, step, keep=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000002", "step_00000003"]
    with pytest.raises(UserError, match="train.keep_checkpoints must be an integer >= 1.*got 0"):
        _save(tmp_path, 4, 4, keep=0)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_00000002", "step_00000003"]


@pytest.mark.parametrize("where", ["save_state", "weights"])
def test_disk_full_during_a_checkpoint_is_one_line_and_removes_the_half_written_folder(tmp_path, monkeypatch, where):
    _save(tmp_path, 1, 1)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "save_state":
        monkeypatch.setattr(FakeAccelerator, "save_state", no_space)
    else:
        monkeypatch.setattr(checkpoint, "save_weights", no_space)
    tmp = tmp_path / "checkpoints" / ".tmp-step_00000002"
    with pytest.raises(UserError) as err:
        _save(tmp_path, 2, 2)
    assert str(err.value) == (f"no space left on device while writing checkpoint {tmp_path / 'checkpoints' / 'step_00000002'}"
                              " (the half-written .tmp-step_00000002 was removed); free some space (or choose another "
                              "folder) and rerun")
    assert not tmp.exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]
    assert _loadable(tmp_path) == (1, 1)


@pytest.mark.parametrize("error,free", [
    # What a real full disk raised here (a 2-60 MB tmpfs): safetensors' error, and torch.save's, which gives no reason.
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), 10**9),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), 1000),
])
def test_a_full_disk_is_recognised_in_the_forms_the_writers_report_it(tmp_path, monkeypatch, error, free):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(FakeAccelerator, "save_state", fail)
    monkeypatch.setattr(dino.durable.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**10, 10**10, free))
    with pytest.raises(UserError, match=r"^no space left on device while writing checkpoint .*step_00000001 \(the "
                                        r"half-written \.tmp-step_00000001 was removed\)"):
        _save(tmp_path, 1, 1)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_torch_write_error_with_space_left_keeps_its_traceback(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(FakeAccelerator, "save_state", fail)
    monkeypatch.setattr(dino.durable.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**10, 0, 10**10))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        _save(tmp_path, 1, 1)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_other_write_errors_keep_their_traceback_and_remove_the_half_written_folder(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(checkpoint, "save_weights", broken)
    with pytest.raises(OSError, match="Input/output error") as err:
        _save(tmp_path, 1, 1)
    assert not isinstance(err.value, UserError)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_disk_full_writing_the_final_weights_is_one_line(tmp_path, monkeypatch):
    class Acc(FakeAccelerator):
        def unwrap_model(self, model):
            return model

    def no_space(state, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointer, "save_weights", no_space)
    saver = checkpointer.Checkpointer(Acc(), tmp_path, torch.nn.Linear(2, 2), None, None, 2, {}, {}, scheduler=None)
    with pytest.raises(UserError, match=f"^no space left on device while writing {tmp_path / 'model.safetensors'};"):
        saver.save_final()
    assert list(tmp_path.iterdir()) == []
