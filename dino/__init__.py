"""dino: DINO object detection (DETR with Improved DeNoising Anchor Boxes).

The public Python API (README.md, "Python"):

- :class:`Detector` (``Detector.load(path)``; ``det(images)``) and its per-image result :class:`Detections`;
- :func:`evaluate`: ``dino eval``, returning the COCO metrics;
- :func:`build_model`: a DINO model with random weights from a preset or a :class:`dino.config.ModelConfig`.

Exporting is ``dino_export.export`` (``dino/`` never imports ``dino_export``; docs/ARCHITECTURE.md).
"""
from dino.evaluation import evaluate
from dino.models.dino import build_model
from dino.predict.detector import Detections, Detector

__version__ = "0.1.0"

__all__ = ["Detector", "Detections", "evaluate", "build_model", "__version__"]
