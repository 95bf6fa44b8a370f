"""DINO model: backbone, position encoding, deformable attention, encoder/decoder/transformer, denoising, detector."""
from dino.models.dino import DINO, build_model

__all__ = ["DINO", "build_model"]
