"""Pictures of detections: boxes, names and scores drawn with ``torchvision.utils.draw_bounding_boxes``.

Readable on dark and light images alike: every box is drawn twice (a dark outline under a coloured line) and every
label sits on a filled background in the box colour, with black or white text chosen by the colour's luminance.
Small images are enlarged before drawing (the shorter side to at least ``MIN_DRAW_SIDE`` pixels) so the text stays
legible, but never past ``MAX_DRAW_SIDE`` on the longer side (a very elongated image is enlarged less, and one
longer than that is shrunk: JPEG cannot store a side over 65,500 pixels). The boxes in ``predictions.json`` are
always in the original image's pixels.
"""
from __future__ import annotations

import functools

import torch
from PIL import ImageFont
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes

from dino.untrusted import printable

MIN_DRAW_SIDE = 480
MAX_DRAW_SIDE = 16384  # well inside the 65,500 pixels per side that JPEG (as Pillow writes it) can store
# Distinct, saturated colours (Tableau 10), one per label (label % 10).
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
_FONT_FILE = "DejaVuSans.ttf"  # searched in the system font folders by PIL; PIL's built-in font otherwise


@functools.cache
def _font_file() -> str | None:
    try:
        ImageFont.truetype(_FONT_FILE, 12)
    except OSError:
        return None
    return _FONT_FILE


def _text_colour(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def draw_detections(image: torch.Tensor, boxes: torch.Tensor, labels: list[int], captions: list[str]) -> torch.Tensor:
    """The picture of one image's detections.

    ``image``: (3, H, W) uint8 RGB, the original image; ``boxes``: (N, 4) xyxy in its pixels; ``labels``: N model
    labels (they pick the colours); ``captions``: N strings such as ``"person 0.87"``, control characters drawn as
    their escapes (``\\r``: :func:`dino.untrusted.printable`).
    Returns (3, H', W') uint8, enlarged when the image's shorter side is below ``MIN_DRAW_SIDE`` (the longer side
    kept at most ``MAX_DRAW_SIDE``), shrunk when the longer side is above ``MAX_DRAW_SIDE``.
    """
    height, width = image.shape[-2:]
    scale = min(max(1.0, MIN_DRAW_SIDE / min(height, width)), MAX_DRAW_SIDE / max(height, width))
    if scale != 1.0:
        size = [max(1, round(height * scale)), max(1, round(width * scale))]
        image = F.resize(image, size, antialias=True)
    height, width = image.shape[-2:]
    if len(boxes) == 0:
        return image
    boxes = boxes.detach().float().cpu() * scale
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)
    # A control character (a class name's "\r") breaks the text layout (raqm fails on it): drawn as its escape.
    captions = [printable(caption) for caption in captions]
    colours = [PALETTE[int(label) % len(PALETTE)] for label in labels]
    line = max(2, round(min(height, width) / 240))
    font_size = max(12, round(min(height, width) / 30))
    font = _font_file()
    # The dark outline first (wider), then the coloured line on top of it: visible on light and dark backgrounds.
    image = draw_bounding_boxes(image, boxes, colors=(0, 0, 0), width=line + 2)
    return draw_bounding_boxes(
        image, boxes, labels=captions, colors=colours, width=line, font=font, font_size=font_size if font else None,
        fill_labels=True, label_colors=[_text_colour(c) for c in colours], label_background_colors=colours,
    )
