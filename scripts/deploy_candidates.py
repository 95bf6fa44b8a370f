"""Candidates for >= 200 FPS at batch 1 (800x1333, dino_r50_4scale), as backends of scripts/bench_deploy.py.

All run the detector in float16 (weights cast, as ``dino export onnx --fp16``; post-processing float32) at a static
shape, and are compared query by query with EAGER float16 on the same weights and layout (against float32 it would
measure the float16 reordering of the encoder's proposal selection, docs/benchmarks.md):

- ``compile_fp16_cudagraphs``: ``torch.compile(mode="reduce-overhead", dynamic=False)`` of the whole deploy model
  including post-processing (one static graph per shape, replayed as a CUDA graph).
- ``compile_fp16_cudagraphs_cl``: the same with the convolutions (backbone, input projections) in channels-last.
- ``cudagraph_fp16``: the eager float16 model captured once per input shape in a CUDA graph
  (``torch.cuda.CUDAGraph``) and replayed: no compiler, setup in seconds. Batch-1 eager is launch-bound (26 FPS
  fp32 on an H200), which is what a graph removes. The capture refuses host-to-device copies inside the forward;
  ``dino/models/transformer.py`` builds the level-shape table with ``torch.as_tensor(list, device=...)``, so this
  row may fail with a capture error (the row then says so; untested: no GPU in the session that wrote it).
- ``aoti_fp16_static``: a static-shape AOTInductor package (the custom-op seam, i.e. our kernel); last, as its
  package load once segfaulted a GPU machine's process (docs/benchmarks.md).

Dry runs (CPU): no CUDA graph (the plain eager call, noted), torch.compile with the ``aot_eager`` backend, the
exported program without the AOTInductor build.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

CANDIDATES = ("compile_fp16_cudagraphs", "compile_fp16_cudagraphs_cl", "cudagraph_fp16", "aoti_fp16_static")


def half_copy(model: nn.Module, channels_last: bool = False) -> nn.Module:
    """A float16 copy of ``model`` (the original stays float32); ``channels_last``: 4-D weights in that layout."""
    half = copy.deepcopy(model).half().eval()
    return half.to(memory_format=torch.channels_last) if channels_last else half


class CudaGraphRunner:
    """Captures ``model(images, mask)`` in one CUDA graph per input shape on the first call with that shape (counted
    as setup by the bench) and replays it; the returned tensors are the graph's static outputs, overwritten by the
    next call. On a CPU it just calls the model."""

    def __init__(self, model: nn.Module):
        self.model, self.graphs = model, {}

    def __call__(self, images: Tensor, mask: Tensor):
        if images.device.type != "cuda":
            return self.model(images, mask)
        key = (tuple(images.shape), images.dtype)
        if key not in self.graphs:
            static = (images.clone(), mask.clone())
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture: library handles, workspace, kernel build
                for _ in range(2):
                    self.model(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = self.model(*static)
            self.graphs[key] = (graph, static, outputs)
        graph, (static_images, static_mask), outputs = self.graphs[key]
        static_images.copy_(images)
        static_mask.copy_(mask)
        graph.replay()
        return outputs
