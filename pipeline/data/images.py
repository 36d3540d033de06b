"""Images as the pipeline reads them: whatever mode and orientation the file has, an upright 8-bit RGB picture."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """Upright (EXIF orientation applied) 8-bit RGB. 16/32-bit integer modes are treated as 0..65535 and scaled to
    0..255 (value / 257, rounded); float 'F' as 0..1 if max <= 1, else clipped to 0..255."""
    if img.getexif().get(0x0112, 1) != 1:  # a phone photo's "rotate on display" tag
        img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode in SIXTEEN_BIT_MODES:
        arr = np.asarray(img).astype(np.float64)
        arr8 = np.rint(np.clip(arr, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr8 = np.rint(np.clip(np.nan_to_num(arr), 0, 255)).astype(np.uint8)
        return Image.fromarray(arr8).convert("RGB")
    return img.convert("RGB")  # L, LA, P, PA, RGBA, CMYK, 1, YCbCr, LAB, HSV
