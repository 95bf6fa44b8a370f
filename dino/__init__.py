"""dino: DINO object detection (DETR with Improved DeNoising Anchor Boxes).

The public Python API (README.md, "Python"):

- :class:`Detector` (``Detector.load(path)``; ``det(images)``) and its per-image result :class:`Detections`;
- :func:`evaluate`: ``dino eval``, returning the COCO metrics;
- :func:`build_model`: a DINO model with random weights from a preset or a :class:`dino.config.ModelConfig`.

Exporting is ``dino_export.export`` (``dino/`` never imports ``dino_export``; docs/ARCHITECTURE.md).

The names are imported on first use (PEP 562), as ``build_model`` always was: importing any ``dino`` module runs
this file first, and ``import dino.config`` (recipe files, the quickstart's re-exec) must not pay for torch,
torchvision and accelerate (0.4 s instead of 36 s, measured on the loaded 2-core VM, 2026-12-07).
"""
__version__ = "0.1.0"

__all__ = ["Detector", "Detections", "evaluate", "build_model", "__version__"]


def __getattr__(name: str):
    if name in ("Detector", "Detections"):
        from dino.predict import detector

        return getattr(detector, name)
    if name == "evaluate":
        from dino.evaluation import evaluate

        return evaluate
    if name == "build_model":
        from dino.models.dino import build_model

        return build_model
    raise AttributeError(f"module 'dino' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
