"""Where an exported ONNX graph departs from the truth, layer by layer: PyTorch float64 is the truth, and PyTorch
float32 and ONNX Runtime float32 are each compared with it at every stage of the detector.

    python scripts/export_drift.py --recipe quickstart --checkpoint outputs/quickstart/model.safetensors \
        --image-size 800 1333

Stages: backbone levels, input projections, each encoder layer, the two-stage proposal features and scores, each
decoder layer, and the heads of every layer. Each candidate's decoder stages are compared with the float64 model run
on that candidate's own query selection, so a near-tied proposal ranked the other way does not show up as a
difference. Prints one row per stage: the largest absolute difference of each candidate from float64, the truth's
own largest magnitude, and the ratio ORT / PyTorch float32 (> 1: the graph is further from the truth than eager).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from dino_export.deploy_model import WithQueryOutputs, build_deploy_model, valid_sizes
from dino_export.group_norm import staged_group_norms
from dino_export.onnx_export import OPSET
from dino_export.query_check import query_boxes_px
from dino_export.tracing import check_inputs, example_inputs, export_program

SELECTION_INDEPENDENT = ("backbone", "input_proj", "encoder", "enc_")


class Probe(nn.Module):
    """The deploy model's six outputs followed by every probed module output, in call order."""

    def __init__(self, deploy: nn.Module):
        super().__init__()
        self.inner = WithQueryOutputs(deploy)
        self.names: list[str] = []
        self._captured: list[torch.Tensor] = []
        self._calls: dict[str, int] = {}
        model = deploy.model
        tr = model.transformer
        points = {"backbone": model.backbone, "enc_output_norm": tr.enc_output_norm,
                  "enc_class": tr.enc_out_class_embed, "enc_bbox": tr.enc_out_bbox_embed,
                  "class_head": model.class_embed, "bbox_head": model.bbox_embed}
        points.update({f"input_proj.{i}": m for i, m in enumerate(model.input_proj)})
        points.update({f"encoder.{i}": m for i, m in enumerate(tr.encoder.layers)})
        points.update({f"decoder.{i}": m for i, m in enumerate(tr.decoder.layers)})
        for name, module in points.items():
            module.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            outs = list(output) if isinstance(output, (list, tuple)) else [output]
            for i, out in enumerate(outs):
                self._captured.append(out)
                if self._recording:
                    call = self._calls.get(name, 0)
                    self.names.append(f"{name}[{i}]" if len(outs) > 1 else f"{name}#{call}")
            self._calls[name] = self._calls.get(name, 0) + 1
        return hook

    _recording = False

    def forward(self, images, mask, query_indices=None):
        self._captured = []
        self._calls = {}
        if query_indices is None:
            outs = self.inner(images, mask)
        else:
            out = self.inner.deploy.run(images, mask, query_indices=query_indices)
            outs = (out.boxes, out.scores, out.labels, out.pred_logits, out.pred_boxes, out.query_indices)
        return (*outs, *self._captured)

    def record_names(self, images, mask) -> None:
        self._recording, self.names = True, []
        with torch.no_grad():
            self(images, mask)
        self._recording = False


def run_onnx(probe: Probe, images, mask, workdir: Path, raw_group_norm: bool) -> list[np.ndarray]:
    import onnxruntime as ort

    example = example_inputs(1, tuple(images.shape[-2:]), seed=0)
    with contextlib.nullcontext() if raw_group_norm else staged_group_norms(probe):
        program = export_program(probe, example, dynamic_batch=False, max_batch=1, custom_op=False)
    onnx_program = torch.onnx.export(program, example, dynamo=True, opset_version=OPSET, optimize=True,
                                     verbose=False)
    path = workdir / "probe.onnx"
    onnx.save(onnx_program.model_proto, str(path))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return session.run(names, {session.get_inputs()[0].name: images.numpy(), session.get_inputs()[1].name: mask.numpy()})


def _np(x) -> np.ndarray:
    return (x.detach().double().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--image-size", nargs=2, type=int, default=[800, 1333])
    parser.add_argument("--seed", type=int, default=101)
    parser.add_argument("--raw-group-norm", action="store_true",
                        help="export GroupNorm as PyTorch's exporter does (InstanceNormalization), not staged")
    args = parser.parse_args()
    torch.manual_seed(0)
    deploy, desc = build_deploy_model(args.recipe, args.checkpoint)
    images, mask = check_inputs(1, tuple(args.image_size), args.seed)
    print(f"{desc}; canvas {args.image_size[0]}x{args.image_size[1]}; the export check's input (seed {args.seed})")

    probe32 = Probe(deploy)
    probe32.record_names(images, mask)
    names = probe32.names
    probe64 = Probe(copy.deepcopy(deploy).double())
    with torch.no_grad():
        pt32 = probe32(images, mask)
        truth_own = probe64(images.double(), mask)
    with tempfile.TemporaryDirectory() as tmp:
        ort32 = run_onnx(probe32, images, mask, Path(tmp), args.raw_group_norm)
    if len(ort32) != len(pt32):
        raise SystemExit(f"the probe graph has {len(ort32)} outputs, eager {len(pt32)}")

    def truth_on(selection) -> tuple:
        sel = torch.as_tensor(np.asarray(selection))
        if torch.equal(sel, truth_own[5]):
            return truth_own
        with torch.no_grad():
            return probe64(images.double(), mask, query_indices=sel)

    t_pt, t_ort = truth_on(pt32[5]), truth_on(ort32[5])
    print(f"selection: PyTorch float32 differs from float64 in {int((pt32[5] != truth_own[5]).sum())} queries, "
          f"ONNX Runtime in {int((torch.as_tensor(ort32[5]) != truth_own[5]).sum())}")
    print(f"{'stage':<22} {'|truth|max':>11} {'pt32-f64':>11} {'ort-f64':>11} {'ort-pt32':>11} {'ratio':>7}")
    rows = [("pred_logits", 3), ("pred_boxes", 4)] + [(n, 6 + i) for i, n in enumerate(names)]
    for name, idx in rows:
        truth_pt, truth_ort = _np(t_pt[idx]), _np(t_ort[idx])
        d_pt = np.abs(_np(pt32[idx]) - truth_pt).max()
        d_ort = np.abs(_np(ort32[idx]) - truth_ort).max()
        d_cross = np.abs(_np(ort32[idx]) - _np(pt32[idx])).max()
        print(f"{name:<22} {np.abs(truth_pt).max():11.4g} {d_pt:11.3g} {d_ort:11.3g} {d_cross:11.3g} "
              f"{d_ort / max(d_pt, 1e-30):7.2f}")
    sizes = truth_own[0].new_tensor([list(valid_sizes(mask)[0])])

    def per_query(a, b) -> str:  # the export check's units: probability and box pixels
        score = np.abs(1 / (1 + np.exp(-_np(a[3]))) - 1 / (1 + np.exp(-_np(b[3])))).max()
        box = np.abs(query_boxes_px(a[4], sizes) - query_boxes_px(b[4], sizes)).max()
        return f"{score:.3g} / {box:.3g} px"

    print(f"per query (probability / box), each from float64 on its own selection: PyTorch float32 "
          f"{per_query(pt32, t_pt)}, ONNX Runtime {per_query(ort32, t_ort)}; ONNX Runtime vs PyTorch float32 "
          f"{per_query(ort32, pt32)}")


if __name__ == "__main__":
    main()
