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

import os
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from PIL import ImageOps

from dino.api_arguments import refuse_url
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


def upright_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """A decoded Pillow image as a viewer shows it: EXIF orientation applied, then RGB (:func:`to_rgb`)."""
    upright = ImageOps.exif_transpose(image)
    return to_rgb(upright if upright is not None else image)


def open_image(path: str | Path) -> PIL.Image.Image:
    """The image at ``path`` decoded, upright (EXIF orientation applied) and RGB. Pillow's errors propagate."""
    with PIL.Image.open(path) as image:
        image.load()  # decodes fully: a truncated file fails here, not later
        return upright_rgb(image)


def read_image(path: Path) -> PIL.Image.Image:
    """The image at ``path`` as a viewer shows it (upright, RGB, transparency on white);
    UserError naming the file when it is not a readable image (also when truncated)."""
    try:
        return open_image(path)
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as err:
        raise UserError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


def _from_array(array: np.ndarray, what: str) -> PIL.Image.Image:
    """An (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA uint8 array as a Pillow image (alpha kept for to_rgb)."""
    if array.dtype != np.uint8:
        raise UserError(f"{what}: dtype {array.dtype}, expected uint8 (0..255)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or 0 in array.shape[:2]:
        raise UserError(f"{what}: shape {tuple(array.shape)}, expected (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) gray")
    return PIL.Image.fromarray(np.ascontiguousarray(array))


def _unit_range(values: torch.Tensor) -> torch.Tensor:
    """``values`` (a float tensor image), UserError unless every value is finite and in [0, 1]."""
    if values.numel() and not bool(torch.isfinite(values).all()):
        raise UserError("tensor image: holds NaN or infinite values; give finite values in [0, 1]")
    if values.numel() and (values.min() < 0.0 or values.max() > 1.0):
        raise UserError(f"tensor image: float values must be in [0, 1] (as torchvision's to_tensor gives), got "
                        f"{values.min().item():.4g}..{values.max().item():.4g}; divide a 0..255 image by 255 or "
                        "give it as uint8")
    return values


def as_picture(image: "PIL.Image.Image | np.ndarray | torch.Tensor | str | os.PathLike") -> PIL.Image.Image:
    """Any image the Python API takes, as the upright RGB Pillow image ``dino predict`` would predict on.

    - a path (str or PathLike): read as ``dino predict`` reads files (:func:`read_image`);
    - a Pillow image: EXIF orientation applied, then converted as a file of its mode would be (:func:`upright_rgb`);
    - a numpy array ``(H, W, 3)`` RGB, ``(H, W, 4)`` RGBA (alpha composited on white) or ``(H, W)`` gray, uint8;
    - a tensor ``(3, H, W)`` (or ``(1|4, H, W)``) RGB, uint8 0..255 or floating point 0..1 (as torchvision's
      ``to_tensor`` gives: scaled by 255 and rounded); float values outside [0, 1] (a 0..255 image given as float)
      or NaN / infinite are refused, not clamped to white or read as black.

    UserError saying what was given when it is none of these.
    """
    if isinstance(image, (str, os.PathLike)):
        refuse_url(image, "image")
        return read_image(Path(image))
    if isinstance(image, PIL.Image.Image):
        return upright_rgb(image)
    if isinstance(image, np.ndarray):
        return to_rgb(_from_array(image, "numpy image"))
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim != 3:
            raise UserError(f"tensor image: shape {tuple(tensor.shape)}, expected (3, H, W)")
        if tensor.is_floating_point():
            tensor = (_unit_range(tensor.float()) * 255.0).round().to(torch.uint8)
        return to_rgb(_from_array(tensor.permute(1, 2, 0).numpy(), "tensor image"))
    raise UserError(f"not an image: {type(image).__name__}; give a path, a PIL image, a numpy (H, W, 3) uint8 array "
                    "or a (3, H, W) tensor")
