"""AOTInductor package of a small detector with real MSDeformAttn layers: compiles on CPU, passes its check, loads
standalone; a package that disagrees with eager fails the check (and `dino export aoti` with it)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dino.errors import UserError
from dino_export.aoti import check_aoti, export_aoti, load_aoti
from dino_export.deploy_model import DeployModel
from dino_export.query_check import ExportCheckError
from dino_export.tracing import check_inputs
from tests.export_standin import StandInDetector

SIZE = (64, 96)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    torch.manual_seed(0)
    model = DeployModel(StandInDetector(), num_select=20).eval()
    path, checks = export_aoti(model, tmp_path_factory.mktemp("aoti") / "model.pt2", SIZE, "cpu",
                               dynamic_batch=True, max_batch=4)
    return model, path, checks


def test_package_passes_its_check_for_batch_1_and_3(package):
    model, path, checks = package
    assert [c.batch for c in checks] == [1, 3]
    for check in checks:
        assert check.detection_box.value <= check.tolerance.box_px
        assert check.detection_score.value <= check.tolerance.score
    runner = load_aoti(path)
    images, mask = check_inputs(3, SIZE, seed=5)
    got = runner(images, mask)
    assert [tuple(t.shape) for t in got] == [(3, 20, 4), (3, 20), (3, 20)]


def test_package_that_disagrees_with_eager_fails_the_check(package):
    model, path, _ = package
    runner = load_aoti(path)

    def shifted(images, mask):
        boxes, scores, labels = runner(images, mask)
        return boxes + 3.0, scores, labels

    with pytest.raises(ExportCheckError, match=r"AOTInductor \(cpu\) disagrees with eager PyTorch \(batch 1\): "
                                               r"largest difference: detection box 3 px at image 0, detection \d+"):
        check_aoti(model, shifted, SIZE, [1], torch.device("cpu"))


def test_package_runs_in_a_process_without_the_project_code(package, tmp_path):
    _, path, _ = package
    script = (
        "import sys, torch\n"
        "r = torch._inductor.aoti_load_package(sys.argv[1])\n"
        "out = r(torch.zeros(2, 3, %d, %d), torch.zeros(2, %d, %d, dtype=torch.bool))\n"
        "assert 'dino' not in sys.modules and 'export' not in sys.modules, 'project code was imported'\n"
        "print(tuple(out[0].shape))\n" % (SIZE + SIZE)
    )
    res = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().endswith("(2, 20, 4)")


def test_package_name_must_end_in_pt2(tmp_path):
    with pytest.raises(UserError, match=r"\.pt2"):
        export_aoti(DeployModel(StandInDetector()), tmp_path / "model.zip", SIZE)


def test_missing_package_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="nope.pt2"):
        load_aoti(tmp_path / "nope.pt2")
