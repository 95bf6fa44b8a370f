"""dino_export: ONNX, OpenVINO, TensorRT, AOTInductor (and the runners of those artifacts) for dino models.

The public Python API is :func:`export` (``dino export onnx|aoti``, returning the path written), imported on first
use (PEP 562) as ``dino``'s names are, so that importing one ``dino_export`` module does not import every exporter.
"""
__all__ = ["export"]


def __getattr__(name: str):
    if name == "export":
        from dino_export.export_model import export

        return export
    raise AttributeError(f"module 'dino_export' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
