"""The allocator defaults of the `dino` command (dino_cli/allocator.py): large blocks stay in the heap after tuning,
only the command-line entry points tune, and DINO_MALLOC_TUNING=0 switches it off."""
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dino_cli
from dino_cli import allocator

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")

# Prints how many bytes of a fresh 64 MiB malloc glibc served with its own mmap (mallinfo2().hblkhd).
PROBE = textwrap.dedent("""
    import ctypes, importlib.util, sys
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    PRELUDE
    block = libc.malloc(64 << 20)
    print(libc.mallinfo2().hblkhd)
    libc.free(block)
""")
LOAD_ALLOCATOR_ALONE = (  # the module file only: importing the dino_cli package would import torch
    f"spec = importlib.util.spec_from_file_location('allocator', {str(REPO / 'dino_cli' / 'allocator.py')!r}); "
    "allocator = importlib.util.module_from_spec(spec); spec.loader.exec_module(allocator); "
    "print(allocator.tune_malloc())")


def mmapped_bytes(prelude: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("DINO_MALLOC_TUNING", "GLIBC_TUNABLES", "LD_PRELOAD")
             and not k.startswith("MALLOC_")}
    result = subprocess.run([sys.executable, "-c", PROBE.replace("PRELUDE", prelude)], capture_output=True, text=True,
                            cwd=REPO, env={**clean, **env}, check=True)
    return result.stdout.split()


def test_tuned_malloc_serves_a_64_mib_block_from_the_heap():
    assert int(mmapped_bytes("pass")[0]) >= 64 << 20  # glibc's default: its own mmap
    applied, mmapped = mmapped_bytes(LOAD_ALLOCATOR_ALONE)
    assert applied == "True" and int(mmapped) < 64 << 20  # what Python's start-up mapped before, not the block


def test_switched_off_by_the_environment_variable_or_the_users_own_settings():
    assert mmapped_bytes(LOAD_ALLOCATOR_ALONE, DINO_MALLOC_TUNING="0")[0] == "False"
    assert int(mmapped_bytes(LOAD_ALLOCATOR_ALONE, DINO_MALLOC_TUNING="0")[1]) >= 64 << 20
    assert mmapped_bytes(LOAD_ALLOCATOR_ALONE, GLIBC_TUNABLES="glibc.malloc.arena_max=2")[0] == "False"
    assert allocator.tune_malloc({"MALLOC_ARENA_MAX_": "1"}) is False
    assert allocator.tune_malloc({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) is False


def test_importing_dino_changes_nothing():
    assert int(mmapped_bytes("import dino, dino_cli")[0]) >= 64 << 20


def test_the_dino_command_and_launch_py_tune_at_start_and_say_so_in_help(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(allocator, "tune_malloc", lambda: calls.append(1))
    for entry in (dino_cli.main, dino_cli.launch_main):
        with pytest.raises(SystemExit):
            entry(["--help"])
    assert calls == [1, 1]
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the epilog
    assert out.count("DINO_MALLOC_TUNING=0 keeps glibc's defaults") == 2
