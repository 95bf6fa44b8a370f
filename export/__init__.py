"""dino_export: ONNX, TensorRT, AOTInductor (and the runners of those artifacts) for dino models.

The public Python API is :func:`export` (``dino export onnx|aoti``, returning the path written).
"""
from dino_export.export_model import export

__all__ = ["export"]
