"""Candidates for >= 200 FPS at batch 1 (800x1333, dino_r50_4scale), as backends of scripts/bench_deploy.py.

All run the detector in float16 (weights cast, as ``dino export onnx --fp16``; post-processing float32) at a static
shape, and are compared query by query with EAGER float16 on the same weights and layout (against float32 it would
measure the float16 reordering of the encoder's proposal selection, docs/benchmarks.md):

- ``compile_fp16_cudagraphs``: ``torch.compile(mode="reduce-overhead", dynamic=False)`` of the whole deploy model
  including post-processing (one static graph per shape, replayed as a CUDA graph).
- ``compile_fp16_cudagraphs_cl``: the same with the convolutions (backbone, input projections) in channels-last.
- ``cudagraph_fp16``: the eager float16 model captured once per input shape in a CUDA graph
  (``torch.cuda.CUDAGraph``) and replayed: no compiler, setup in seconds. Batch-1 eager is launch-bound (26 FPS
  fp32 on an H200), which is what a graph removes. The forward copies a few shape-derived constants from the host
  (``torch.as_tensor(level shapes, device=...)`` in dino/models/transformer.py, ``scale.to(device)`` in
  dino/models/dino.py); a pageable copy synchronises, which a capture refuses, so during the capture they are staged
  in pinned buffers kept alive with the graph (:func:`pinned_host_copies`), in the "relaxed" capture mode. Untested
  on a GPU (none in the session that wrote it): a remaining capture error makes the row say so.
- ``aoti_fp16_static``: a static-shape AOTInductor package (the custom-op seam, i.e. our kernel); last, as its
  package load once segfaulted a GPU machine's process (docs/benchmarks.md).

Dry runs (CPU): no CUDA graph (the plain eager call, noted), torch.compile with the ``aot_eager`` backend, the
exported program without the AOTInductor build.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from torch import Tensor, nn

CANDIDATES = ("compile_fp16_cudagraphs", "compile_fp16_cudagraphs_cl", "cudagraph_fp16", "aoti_fp16_static")


def half_copy(model: nn.Module, channels_last: bool = False) -> nn.Module:
    """A float16 copy of ``model`` (the original stays float32); ``channels_last``: 4-D weights in that layout."""
    half = copy.deepcopy(model).half().eval()
    return half.to(memory_format=torch.channels_last) if channels_last else half


@contextlib.contextmanager
def pinned_host_copies(buffers: list[Tensor]):
    """While active, ``tensor.to(cuda)`` of a CPU tensor and ``torch.as_tensor(data, device=cuda)`` stage the data in
    one of ``buffers`` (pinned, allocated before: a capture may not allocate host memory) and copy it asynchronously:
    a capture records that copy and every replay re-reads the buffer, so each buffer is used once and must live as
    long as the graph, holding values that do not change between replays (here: constants of the static shape)."""
    original_to, original_as_tensor = torch.Tensor.to, torch.as_tensor
    free = list(buffers)

    def to_cuda(device) -> bool:
        return isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda"

    def to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if self.device.type == "cpu" and to_cuda(target) and not self.is_pinned():
            if not free or free[0].numel() * free[0].element_size() < self.numel() * self.element_size():
                raise RuntimeError(f"pinned_host_copies: no staging buffer left for a {tuple(self.shape)} copy")
            host = free.pop(0).view(torch.uint8)[: self.numel() * self.element_size()].view(self.dtype)
            host.copy_(self.reshape(-1))
            return original_to(host.view(self.shape), *args, **{**kwargs, "non_blocking": True})
        return original_to(self, *args, **kwargs)

    def as_tensor(data, dtype=None, device=None):
        if to_cuda(device) and not isinstance(data, torch.Tensor):
            return to(original_as_tensor(data, dtype=dtype), device)
        return original_as_tensor(data, dtype=dtype, device=device)

    torch.Tensor.to, torch.as_tensor = to, as_tensor
    try:
        yield
    finally:
        torch.Tensor.to, torch.as_tensor = original_to, original_as_tensor


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
            # 64 staging buffers of 4 KiB for the forward's few host constants; kept with the graph.
            buffers = [torch.empty(4096, dtype=torch.uint8, pin_memory=True) for _ in range(64)]
            with pinned_host_copies(buffers), torch.cuda.graph(graph, capture_error_mode="relaxed"):
                outputs = self.model(*static)
            self.graphs[key] = (graph, static, outputs, buffers)
        graph, (static_images, static_mask), outputs, _ = self.graphs[key]
        static_images.copy_(images)
        static_mask.copy_(mask)
        graph.replay()
        return outputs
