"""Running a serialized TensorRT engine on torch CUDA tensors (TensorRT 10.x / 11.x name-based I/O API)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from export.trt_engine import load_plugin_libraries


class TensorRTRunner:
    """``boxes, scores, labels = runner(images)`` for an engine built by :func:`export.trt_engine.build_engine`.

    ``images``: (B, 3, H, W) CUDA tensor; outputs are new CUDA tensors in the engine's output order and types.
    """

    def __init__(self, engine_path: str | os.PathLike, plugin_libs: list[str | os.PathLike] | None = None):
        import tensorrt as trt

        path = Path(engine_path)
        if not path.is_file():
            raise FileNotFoundError(f"TensorRT engine {path} does not exist")
        load_plugin_libraries([Path(p) for p in plugin_libs or []])
        self._trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(logger, "")
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {path} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def _torch_dtype(self, name: str) -> torch.dtype:
        trt = self._trt
        table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
                 trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
        if hasattr(trt.DataType, "BF16"):
            table[trt.DataType.BF16] = torch.bfloat16
        return table[self.engine.get_tensor_dtype(name)]

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not images.is_cuda:
            raise ValueError("TensorRT runs on CUDA tensors; move the images to the GPU")
        name = self.inputs[0]
        images = images.to(self._torch_dtype(name)).contiguous()
        self.context.set_input_shape(name, tuple(images.shape))
        self.context.set_tensor_address(name, images.data_ptr())
        outs = []
        for out_name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(out_name))
            tensor = torch.empty(shape, dtype=self._torch_dtype(out_name), device=images.device)
            self.context.set_tensor_address(out_name, tensor.data_ptr())
            outs.append(tensor)
        stream = torch.cuda.current_stream(images.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return tuple(outs)
