"""AOTInductor package of a small detector with real MSDeformAttn layers: compiles on CPU, loads standalone, matches."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from export.aoti import export_aoti, load_aoti
from export.deploy_model import DeployModel
from tests.export_standin import StandInDetector

SIZE = (64, 96)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    torch.manual_seed(0)
    model = DeployModel(StandInDetector(), num_select=20).eval()
    path = export_aoti(model, tmp_path_factory.mktemp("aoti") / "model.pt2", SIZE, "cpu", dynamic_batch=True,
                       max_batch=4)
    return model, path


def test_package_matches_eager_for_batch_1_and_3(package):
    model, path = package
    runner = load_aoti(path)
    for batch in (1, 3):
        images = torch.randn(batch, 3, *SIZE, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            ref = model(images)
        got = runner(images)
        assert got[0].shape == (batch, 20, 4)
        torch.testing.assert_close(got[0], ref[0], atol=1e-3 * max(SIZE), rtol=0)
        torch.testing.assert_close(got[1], ref[1], atol=1e-4, rtol=0)
        assert torch.equal(got[2][:, 0], ref[2][:, 0])


def test_package_runs_in_a_process_without_the_project_code(package, tmp_path):
    _, path = package
    script = (
        "import sys, torch\n"
        "r = torch._inductor.aoti_load_package(sys.argv[1])\n"
        "out = r(torch.zeros(2, 3, %d, %d))\n"
        "assert 'dino' not in sys.modules and 'export' not in sys.modules, 'project code was imported'\n"
        "print(tuple(out[0].shape))\n" % SIZE
    )
    res = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("(2, 20, 4)")


def test_package_name_must_end_in_pt2(tmp_path):
    with pytest.raises(ValueError, match=r"\.pt2"):
        export_aoti(DeployModel(StandInDetector()), tmp_path / "model.zip", SIZE)


def test_missing_package_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt2"):
        load_aoti(tmp_path / "nope.pt2")
