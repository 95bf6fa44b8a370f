"""dino: DINO object detection (DETR with Improved DeNoising Anchor Boxes)."""
__version__ = "0.1.0"


def build_model(preset):
    """Builds a DINO model with random weights (no download) from a preset name or a ModelConfig."""
    from dino.models.dino import build_model as _build

    return _build(preset)


__all__ = ["build_model", "__version__"]
