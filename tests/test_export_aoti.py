"""AOTInductor package of a small detector with real MSDeformAttn layers: compiles on CPU, passes its check, loads
standalone; a package that disagrees with eager fails the check (and `dino export aoti` with it)."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch

from dino.errors import UserError
from dino.predict.artifacts import AotiBackend
from dino.predict.labels import ArtifactLabels, label_metadata
from dino_export.aoti import check_aoti, export_aoti, load_aoti
from dino_export.deploy_model import DeployModel
from dino_export.query_check import FP32_TOLERANCE, ExportCheckError, Tolerance
from dino_export.tracing import check_inputs
from tests.export_standin import StandInDetector

SIZE = (64, 96)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    torch.manual_seed(0)
    model = DeployModel(StandInDetector(), num_select=20).eval()
    path, checks = export_aoti(model, tmp_path_factory.mktemp("aoti") / "model.pt2", SIZE, "cpu",
                               dynamic_batch=True, max_batch=4, labels=label_metadata(5, None))
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
    # The detections, then the per-query outputs they were selected from (the stand-in: 10 queries, 5 classes).
    assert [tuple(t.shape) for t in got] == [(3, 20, 4), (3, 20), (3, 20), (3, 10, 5), (3, 10, 4), (3, 10)]


def test_package_records_its_size_and_classes(package):
    """`dino predict --aoti` needs no --image-size and names labels by the recorded classes; the file is 0644-like."""
    _, path, _ = package
    backend = AotiBackend(path, None, "cpu")
    assert backend.input_size == SIZE and backend.labels == ArtifactLabels(5, None)
    with pytest.raises(UserError, match=r"--image-size 64 64 differs from the size .*model.pt2 was exported for "
                                        r"\(64 96\): omit --image-size"):
        AotiBackend(path, (64, 64), "cpu")
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_package_that_disagrees_with_eager_fails_the_check(package):
    model, path, _ = package
    runner = load_aoti(path)

    def shifted(images, mask):
        boxes, scores, labels, logits, query_boxes, indices = runner(images, mask)
        return boxes, scores, labels, logits, query_boxes + 0.01, indices

    # cxcywh + 0.01 moves x2 by 0.015 of the 72 px valid width: 1.08 px, against eager (per query) and against the
    # package's own detections, which were not moved.
    with pytest.raises(ExportCheckError, match=r"AOTInductor \(cpu\) disagrees with eager PyTorch float64 \(batch 1\): "
                                               r"largest difference: (per-query|detection) box 1.08 px at image 0"):
        check_aoti(model, shifted, SIZE, [1], torch.device("cpu"))


def test_package_that_reselects_near_tied_queries_passes_on_its_own_selection(package):
    """A package that ranked two near-tied proposals the other way is compared with eager PyTorch rerun on its
    selection (matching detections by query alone would count the swapped queries as wrong)."""
    model, path, _ = package
    runner = load_aoti(path)
    images, mask = check_inputs(1, SIZE, seed=101)
    with torch.no_grad():
        reference = model.run(images, mask)
    probs = reference.proposal_scores[0].sigmoid()
    gaps = (probs[:-1] - probs[1:]).abs()
    q = int(gaps.argmin())  # the closest pair of neighbouring ranks: a plausible swap
    # The stand-in has no exact near-ties: a score tolerance just above this pair's gap stands for one.
    tolerance = Tolerance(score=2 * float(gaps[q]) + 1e-6, box_px=FP32_TOLERANCE.box_px)
    swapped = reference.query_indices.clone()
    swapped[0, [q, q + 1]] = swapped[0, [q + 1, q]]

    def reselecting(images, mask):
        with torch.no_grad():
            out = model.run(images, mask, query_indices=swapped)
        return out.boxes, out.scores, out.labels, out.pred_logits, out.pred_boxes, out.query_indices

    check = check_aoti(model, reselecting, SIZE, [1], torch.device("cpu"), tolerance, seed=100)[0]
    assert check.reselected == 2
    assert check.query_box.value == 0.0 and check.selection_score.value <= check.tolerance.score


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
