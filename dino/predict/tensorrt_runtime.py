"""Running a serialized TensorRT engine on torch CUDA tensors (TensorRT 10.x / 11.x name-based I/O API), and the two
steps building and running share: importing ``tensorrt`` (only when used) and loading plugin libraries."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from dino.errors import UserError
from dino.predict.backend import INPUT_NAMES, OUTPUT_NAMES


def load_plugin_libraries(libs: list[Path]) -> None:
    """dlopens each library globally; its static initializer registers the plugin creators with TensorRT."""
    for lib in libs:
        ctypes.CDLL(str(Path(lib).resolve()), mode=ctypes.RTLD_GLOBAL)


def import_tensorrt():
    """The ``tensorrt`` module, or UserError saying how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise UserError("TensorRT is not installed: `pip install tensorrt` (10.x or 11.x, with a CUDA GPU) to build "
                        "engines; the ONNX export works without it") from None
    return tensorrt


class TensorRTRunner:
    """``boxes, scores, labels = runner(images, mask)`` for an engine built by ``dino export trt``.

    ``images (B, 3, H, W)`` float and ``mask (B, H, W)`` bool CUDA tensors (the deploy-graph contract); outputs are
    new CUDA tensors in the contract's order, in the engine's types.
    """

    def __init__(self, engine_path: str | os.PathLike, plugin_libs: list[str | os.PathLike] | None = None):
        trt = import_tensorrt()
        path = Path(engine_path)
        if not path.is_file():
            raise UserError(f"TensorRT engine {path} does not exist")
        load_plugin_libraries([Path(p) for p in plugin_libs or []])
        self._trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(logger, "")
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UserError(f"TensorRT could not deserialize {path} (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = {n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        outputs = {n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT}
        if inputs != set(INPUT_NAMES) or not set(OUTPUT_NAMES) <= outputs:
            raise UserError(f"{path}: engine inputs {sorted(inputs)} / outputs {sorted(outputs)} are not the deploy "
                            f"graph's {list(INPUT_NAMES)} / {list(OUTPUT_NAMES)}")

    def _torch_dtype(self, name: str) -> torch.dtype:
        trt = self._trt
        table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
                 trt.DataType.INT64: torch.int64, trt.DataType.BOOL: torch.bool}
        if hasattr(trt.DataType, "BF16"):
            table[trt.DataType.BF16] = torch.bfloat16
        return table[self.engine.get_tensor_dtype(name)]

    def __call__(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not images.is_cuda or not mask.is_cuda:
            raise ValueError("TensorRT runs on CUDA tensors; move the images and mask to the GPU")
        feeds = {"images": images, "mask": mask}
        for name in INPUT_NAMES:
            tensor = feeds[name].to(self._torch_dtype(name)).contiguous()
            feeds[name] = tensor  # keeps the converted tensor alive until the launch is done
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outs = []
        for out_name in OUTPUT_NAMES:
            shape = tuple(self.context.get_tensor_shape(out_name))
            tensor = torch.empty(shape, dtype=self._torch_dtype(out_name), device=images.device)
            self.context.set_tensor_address(out_name, tensor.data_ptr())
            outs.append(tensor)
        stream = torch.cuda.current_stream(images.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return tuple(outs)
