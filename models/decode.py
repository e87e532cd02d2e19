"""Bytes to an upright RGB array sized for the models, or an error that names the problem.

The decoder policy, one for every path that decodes untrusted bytes (annotate, `lakelens
query --image`, the service's uploads and /images):
- Only ALLOWED_FORMATS are decoded (JPEG, PNG, WebP, GIF, BMP, TIFF, HEIF/HEIC, AVIF). The
  format is sniffed from the first bytes and Pillow is handed exactly that one plugin
  (`Image.open(formats=[...])`), never its scan of every plugin: bytes that match no
  allowed magic (EPS, which would reach Ghostscript, PDF, SVG, PSD, ...) are refused with a
  NotAnImageError naming the allowed formats.
- A pixel limit is checked on the header size, before any pixel is allocated: ours
  (`max_pixels`) right after `Image.open`, which parses the header only, and Pillow's own
  (DecompressionBombError at 2 x Image.MAX_IMAGE_PIXELS, raised inside `Image.open`) as
  the ceiling. `probe_image` is that check alone, for budgets over several images.
- A byte cap per read (`read_file`, `read_capped`): a file's size is checked before its
  bytes are read when the size is known, and at most cap + 1 bytes are read otherwise.

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
import os
import re
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_IMAGE_MB = 64.0  # bytes read per image at most (--max-image-mb)
# Sniffed name -> Pillow's format name: the only formats lakelens decodes.
ALLOWED_FORMATS: dict[str, str] = {"JPEG": "JPEG", "PNG": "PNG", "WebP": "WEBP", "GIF": "GIF",
                                   "BMP": "BMP", "TIFF": "TIFF", "HEIF": "HEIF", "AVIF": "AVIF"}
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


class FileTooLargeError(ValueError):
    """An image file over the byte cap (--max-image-mb); refused before its bytes are read.
    The class name is the error row's error_type (a read error, permanent until the file
    changes)."""


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

    Only ALLOWED_FORMATS are decoded; more than `max_pixels` (from the header) is refused
    before any pixel is allocated. Raises a DecodeError subclass with a one-line message for
    anything unreadable.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = _open(data, max_pixels)
        w, h = im.size
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


def probe_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) as stored, from the header alone (nothing is decoded), under the same
    policy as decode_image: the same errors for a disallowed format, a bad header or too
    many pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with _open(data, max_pixels) as im:
            return im.size


def open_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image under the decoder policy (the one allowed plugin its first bytes name, its
    pixel count checked), pixels not loaded: for readers outside annotate (training sets,
    class maps) that need Pillow's image itself. Raises DecodeError (a ValueError)."""
    return _open(data, max_pixels)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The image, header parsed and checked, pixels not loaded: Pillow tries only the one
    allowed plugin the first bytes name."""
    if not data:
        raise EmptyFileError("the file is empty (0 bytes)")
    fmt = _sniff(data)
    if fmt is None:
        raise NotAnImageError(unsupported_message(data))
    if fmt in MISSING_CODECS:
        raise UnsupportedFormatError(MISSING_CODECS[fmt])
    # One plugin only: never Pillow's scan of all of them (formats=None). ISO-BMFF files go
    # to the plugin their brand names: pillow-heif also accepts the generic brand mif1 and
    # would fail on an AVIF labelled so only when decoding.
    try:
        im = Image.open(io.BytesIO(data), formats=[ALLOWED_FORMATS[fmt]])
    except UnidentifiedImageError as e:
        raise CorruptImageError(f"starts like a {fmt} file but cannot be parsed") from e
    except Image.DecompressionBombError as e:
        # Pillow's ceiling (2 x Image.MAX_IMAGE_PIXELS), checked on the header size inside
        # Image.open, before any pixel is allocated; its message holds the pixel count.
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = int(found.group(1)) if found else None
        if pixels is not None and pixels > max_pixels:
            raise ImageTooLargeError(
                f"{pixels} pixels exceeds the limit of {max_pixels} (--max-pixels)") from e
        raise ImageTooLargeError(f"{_one_line(e)} (Pillow's limit, PIL.Image.MAX_IMAGE_PIXELS)") from e
    except Exception as e:
        raise CorruptImageError(f"cannot read the image header: {_describe(e)}") from e
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageTooLargeError(
            f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} (--max-pixels)")
    if w == 0 or h == 0:
        im.close()
        raise CorruptImageError(f"the header says the image is {w}x{h}")
    return im


def unsupported_message(data: bytes) -> str:
    """One line for bytes that match no allowed format: what they look like, if known."""
    head = data[:12]
    name = next((n for magic, n in OTHER_MAGIC if head.startswith(magic)), None)
    if name is None and data[:256].lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith((b"<?xml", b"<svg")):
        name = "SVG/XML"
    what = f" {name}" if name else ""
    return (f"unsupported image format{what} (first bytes {head!r}); allowed: "
            f"{', '.join(ALLOWED_FORMATS)}")


MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"),
         (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
         (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"))  # the last two: BigTIFF
# Formats refused by name in the message (never decoded): a hint, not a policy.
OTHER_MAGIC = ((b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"),
               (b"8BPS", "PSD"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"),
               (b"qoif", "QOI"), (b"\x00\x00\x01\x00", "ICO"), (b"RIFF", "RIFF (not WebP)"))


def _sniff(data: bytes) -> str | None:
    """The allowed format a file's first bytes claim, if any."""
    if data[4:8] == b"ftyp":
        return _sniff_ftyp(data)
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WebP"
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


def max_image_bytes(mb: float) -> int:
    """--max-image-mb in bytes."""
    return int(mb * 2**20)


def check_file_size(size: int, max_bytes: int | None) -> None:
    """Raise FileTooLargeError when a file of `size` bytes is over the cap (None: no cap)."""
    if max_bytes is not None and size > max_bytes:
        raise FileTooLargeError(f"the file is {size} bytes ({size / 2**20:.1f} MiB), over the cap of "
                                f"{max_bytes} bytes ({max_bytes / 2**20:g} MiB, --max-image-mb)")


def read_capped(f: BinaryIO, max_bytes: int | None, *, size: int | None = None) -> bytes:
    """The rest of `f`, at most `max_bytes` of it. A known `size` is checked before reading;
    whatever the size said, at most max_bytes + 1 bytes are read (a file may grow)."""
    if max_bytes is None:
        return f.read()
    if size is not None:
        check_file_size(size, max_bytes)
    data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLargeError(f"the file is more than {max_bytes} bytes, over the cap of "
                                f"{max_bytes} bytes ({max_bytes / 2**20:g} MiB, --max-image-mb)")
    return data


def read_file(path: str | os.PathLike, max_bytes: int | None) -> bytes:
    """A local file's bytes under the byte cap: its size is checked (fstat) before reading."""
    with open(path, "rb") as f:
        return read_capped(f, max_bytes, size=os.fstat(f.fileno()).st_size)
