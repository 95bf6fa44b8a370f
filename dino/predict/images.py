"""Image files for ``dino predict``, read as an image viewer shows them: EXIF orientation applied, every mode made RGB.

- Orientation: the EXIF ``Orientation`` tag is applied (``PIL.ImageOps.exif_transpose``), so a phone photo stored
  sideways is predicted upright, and the boxes, ``width``/``height`` in predictions.json and the picture are all in
  that displayed orientation.
- 16-bit grayscale (modes ``I;16``, ``I;16B``, ``I;16L``, and ``I``, in which Pillow opens some 16-bit files): the
  full 16-bit range 0..65535 is mapped to 0..255 (value / 257, rounded; ``I`` values outside 0..65535 clipped).
  Pillow's own ``convert`` clips these to 255, which gave pure white images and no detections.
- 32-bit float (``F``): values in [0, 1] are scaled by 255; otherwise the values are taken as 0..255 (clipped).
- Transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, or ``P``/``L``/``RGB`` with a transparent
  colour): composited on :data:`TRANSPARENT_BACKGROUND` (white, as a web page shows it) instead of dropping alpha,
  which would show the colours hidden under fully transparent pixels.
- Anything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``RGBX``): Pillow's ``convert("RGB")``.

Training and evaluation do not apply EXIF orientation: a COCO dataset's boxes are annotated on the stored pixels (as
pycocotools and the official code read them), so ``dino.data`` keeps the stored orientation.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
from PIL import ImageOps

from dino.errors import UserError

TRANSPARENT_BACKGROUND = (255, 255, 255)  # white: transparent pixels are predicted (and drawn) as white
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _gray_to_rgb(values: np.ndarray) -> PIL.Image.Image:
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(gray, mode="L").convert("RGB")


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """``image`` (any Pillow mode, decoded) as 8-bit RGB by the rules of the module docstring."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _SIXTEEN_BIT_MODES:
        return _gray_to_rgb(np.asarray(image, dtype=np.float64) / 257.0)
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        in_unit_range = values.size == 0 or (values.min() >= 0.0 and values.max() <= 1.0)
        return _gray_to_rgb(values * 255.0 if in_unit_range else values)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (*TRANSPARENT_BACKGROUND, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(path: str | Path) -> PIL.Image.Image:
    """The image at ``path`` decoded, upright (EXIF orientation applied) and RGB. Pillow's errors propagate."""
    with PIL.Image.open(path) as image:
        image.load()  # decodes fully: a truncated file fails here, not later
        upright = ImageOps.exif_transpose(image)
        return to_rgb(upright if upright is not None else image)


def read_image(path: Path) -> PIL.Image.Image:
    """The image at ``path`` as a viewer shows it (upright, RGB, transparency on white);
    UserError naming the file when it is not a readable image (also when truncated)."""
    try:
        return open_image(path)
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as err:
        raise UserError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
