"""Bytes to an upright RGB array sized for the models, or an error that names the problem.

Handles: EXIF orientation (applied; sizes and coordinates are of the upright image),
CMYK, 16-bit and float grayscale, palette (with transparency), RGBA/LA (composited on
white), 1-bit, animated GIF / multipage TIFF (first frame), HEIC/HEIF (via pillow-heif)
and AVIF (Pillow >= 11.3), and a pixel limit checked from the header before any pixel is
allocated. JPEGs are decoded at a reduced scale (libjpeg's DCT scaling) when the models
need fewer pixels.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 100_000_000
ORIENTATION_TAG = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
IMAGE_EXTENSIONS: frozenset[str] = frozenset({
    ".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp",
    ".heic", ".heif", ".avif"})
HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"})
AVIF_BRANDS = frozenset({b"avif", b"avis"})
GENERIC_BRANDS = frozenset({b"mif1", b"msf1"})  # the codec is named by a compatible brand


def _register_codecs() -> dict[str, str]:
    """Register the HEIF opener; returns {format: why it cannot be decoded} for missing codecs."""
    missing: dict[str, str] = {}
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
    except ImportError:  # not installed, or its compiled part failed to load
        missing["HEIF"] = "HEIC needs the pillow-heif package: pip install pillow-heif"
    try:
        has_avif = features.check_module("avif")
    except ValueError:  # Pillow < 11.2 does not know the feature
        has_avif = False
    if not has_avif:
        missing["AVIF"] = "AVIF needs Pillow >= 11.3 built with libavif: pip install -U pillow"
    return missing


MISSING_CODECS: dict[str, str] = _register_codecs()


class DecodeError(ValueError):
    """An image that cannot be decoded; the class name is the error row's error_type."""


class EmptyFileError(DecodeError):
    pass


class NotAnImageError(DecodeError):
    pass


class TruncatedImageError(DecodeError):
    pass


class CorruptImageError(DecodeError):
    pass


class ImageTooLargeError(DecodeError):
    pass


class UnsupportedFormatError(DecodeError):
    """A recognised format whose decoder is not installed."""


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # uint8[h, w, 3], upright RGB, at most the requested size
    width: int  # upright width of the original image
    height: int  # upright height of the original image

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): multiply pixel coordinates of `pixels` by these for original ones."""
        h, w = self.pixels.shape[:2]
        return self.width / w, self.height / h


def target_size(width: int, height: int, short: int | None, long: int | None) -> tuple[int, int]:
    """(w, h) after scaling down so the shorter side is <= short and the longer <= long.

    The same rule as torchvision's GeneralizedRCNNTransform, but never enlarging; no side
    goes below one pixel.
    """
    scale = 1.0
    if short:
        scale = min(scale, short / min(width, height))
    if long:
        scale = min(scale, long / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 short: int | None = None, long: int | None = None) -> Decoded:
    """Decode `data` to an upright RGB image no larger than (short, long).

    Raises a DecodeError subclass with a one-line message for anything unreadable.
    """
    if not data:
        raise EmptyFileError("the file is empty (0 bytes)")
    fmt = _sniff(data)
    if fmt in MISSING_CODECS:
        raise UnsupportedFormatError(MISSING_CODECS[fmt])
    # ISO-BMFF files go straight to the plugin their brand names: pillow-heif also accepts
    # the generic brand mif1 and would fail on an AVIF labelled so only when decoding.
    formats = [fmt] if fmt in ("HEIF", "AVIF") else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=formats)
        except UnidentifiedImageError as e:
            if fmt:
                raise CorruptImageError(f"starts like a {fmt} file but cannot be parsed") from e
            raise NotAnImageError(
                f"not a recognised image format (starts with {data[:8]!r})") from e
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(_one_line(e)) from e
        except Exception as e:
            raise CorruptImageError(f"cannot read the image header: {_describe(e)}") from e
        w, h = im.size
        if w * h > max_pixels:
            raise ImageTooLargeError(
                f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} (--max-pixels)")
        if w == 0 or h == 0:
            raise CorruptImageError(f"the header says the image is {w}x{h}")
        # libheif applies HEIF's own rotation (irot/imir) on decode, and in HEIF the EXIF
        # orientation is informative only (pillow-heif resets it to 1): never rotate twice.
        orientation = 1 if im.format == "HEIF" else _orientation(im)
        up_w, up_h = (h, w) if orientation in TRANSPOSED_ORIENTATIONS else (w, h)
        final = target_size(up_w, up_h, short, long)
        if im.format == "JPEG" and final != (up_w, up_h):
            fw, fh = final if orientation not in TRANSPOSED_ORIENTATIONS else final[::-1]
            im.draft(im.mode, (fw, fh))  # DCT scaling: decodes at >= the requested size
        try:
            im.load()
        except OSError as e:
            if "truncated" in str(e).lower():
                raise TruncatedImageError(f"the file is truncated ({_one_line(e)})") from e
            raise CorruptImageError(_describe(e)) from e
        except Exception as e:
            raise CorruptImageError(_describe(e)) from e
        im = ImageOps.exif_transpose(im) if orientation != 1 else im
        im = _to_rgb(im)
        if im.size != final:
            im = im.resize(final, Image.Resampling.BILINEAR)
    return Decoded(np.asarray(im, dtype=np.uint8), up_w, up_h)


MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
         (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"RIFF", "WebP"))


def _sniff(data: bytes) -> str | None:
    """The format a file's first bytes claim, if any."""
    if data[4:8] == b"ftyp":
        return _sniff_ftyp(data)
    return next((fmt for magic, fmt in MAGIC if data.startswith(magic)), None)


def _sniff_ftyp(data: bytes) -> str | None:
    """HEIF or AVIF from an ISO-BMFF ftyp box: the major brand, and for a generic one
    (mif1, msf1) the compatible brands that follow the minor version."""
    major = data[8:12]
    if major in AVIF_BRANDS:
        return "AVIF"
    if major not in HEIF_BRANDS:
        return None
    if major in GENERIC_BRANDS:
        end = min(int.from_bytes(data[:4], "big"), len(data), 256)
        if any(data[i:i + 4] in AVIF_BRANDS for i in range(16, end - 3, 4)):
            return "AVIF"
    return "HEIF"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {_one_line(e)}"


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # a damaged EXIF block is not worth losing the image for
        return 1
    return value if 1 <= value <= 8 else 1


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency composited on white."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im).astype(np.int64)
        gray = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if im.mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float32))
        lo, hi = float(arr.min()), float(arr.max())
        span = hi - lo if hi > lo else 1.0
        gray = ((arr - lo) / span * 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
