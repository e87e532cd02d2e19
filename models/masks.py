"""Instance masks: from a model's probability crop to COCO RLE in original pixels."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def _sample_axis(n_out: int, scale: float, n_in: int, start: int) -> tuple[np.ndarray, ...]:
    """Bilinear source indices/weights for output pixels 0..n_out-1 (pixel centers aligned)."""
    src = (np.arange(n_out, dtype=np.float32) + 0.5) / scale - 0.5 - start
    src = np.clip(src, 0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def crop_to_rle(
    crop: np.ndarray,
    top: int,
    left: int,
    *,
    scale_y: float,
    scale_x: float,
    height: int,
    width: int,
    threshold: float = 0.5,
) -> dict:
    """COCO RLE of a binary mask in original pixels.

    crop: float[h, w] mask probabilities covering rows top..top+h, columns left..left+w of
    the image the model saw; that image times (scale_y, scale_x) is the original,
    height x width. Probabilities outside the crop are zero. Returns
    {"size": [height, width], "counts": str}.
    """
    full = np.zeros((height, width), dtype=np.uint8, order="F")
    h, w = crop.shape
    if h and w:
        # Original-pixel window that the crop covers (one pixel of slack each side).
        y0, y1 = max(0, int(top * scale_y) - 1), min(height, int(np.ceil((top + h) * scale_y)) + 1)
        x0, x1 = max(0, int(left * scale_x) - 1), min(width, int(np.ceil((left + w) * scale_x)) + 1)
        if y1 > y0 and x1 > x0:
            r0, r1, wy = _sample_axis(y1, scale_y, h, top)
            c0, c1, wx = _sample_axis(x1, scale_x, w, left)
            r0, r1, wy = r0[y0:], r1[y0:], wy[y0:, None]
            c0, c1, wx = c0[x0:], c1[x0:], wx[x0:]
            crop = crop.astype(np.float32, copy=False)
            top_row = crop[r0][:, c0] * (1 - wx) + crop[r0][:, c1] * wx
            bottom_row = crop[r1][:, c0] * (1 - wx) + crop[r1][:, c1] * wx
            prob = top_row * (1 - wy) + bottom_row * wy
            full[y0:y1, x0:x1] = prob >= threshold
    rle = mask_utils.encode(full)
    return {"size": [int(height), int(width)], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Decode {"size": [h, w], "counts": str} to a uint8[h, w] binary mask."""
    return mask_utils.decode({"size": list(rle["size"]), "counts": rle["counts"].encode("ascii")})
