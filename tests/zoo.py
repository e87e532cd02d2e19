"""The bad-input zoo: files that a real image lake holds, each with its exact outcome."""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pillow_heif
from PIL import Image

pillow_heif.register_heif_opener()  # lets Image.save write format="HEIF"

EXIF_ORIENTATION = 0x0112
ZOO_MAX_IMAGE_MB = 5.0  # annotate's --max-image-mb for the zoo: large.jpg (4 MB) passes, over_cap.bmp not


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    stage: str | None = None  # None: a result row; else the error row's stage
    error_type: str | None = None
    size: tuple[int, int] | None = None  # upright (width, height) of a result row
    needles: tuple[str, ...] = ()  # parts of an error row's message


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def build_zoo(root: Path) -> list[Case]:
    """Write the zoo under root/lake; returns every case an annotate run must report."""
    lake = root / "lake"
    lake.mkdir(parents=True)
    cases: list[Case] = []

    def ok(name: str, size: tuple[int, int]) -> None:
        cases.append(Case(name, lake / name, size=size))

    def bad(name: str, stage: str, error_type: str) -> None:
        cases.append(Case(name, lake / name, stage, error_type))

    _noise(64, 48).save(lake / "plain.jpg", quality=90)
    ok("plain.jpg", (64, 48))
    _noise(40, 30).save(lake / "UPPER.JPG", quality=90)
    ok("UPPER.JPG", (40, 30))
    _noise(50, 40).save(lake / "png_named.jpg", format="PNG")
    ok("png_named.jpg", (50, 40))
    data = _jpeg_bytes(_noise(200, 150))
    (lake / "truncated.jpg").write_bytes(data[: len(data) * 2 // 3])
    bad("truncated.jpg", "decode", "TruncatedImageError")
    (lake / "garbage.jpg").write_bytes(data[:20] + bytes(np.random.default_rng(1).integers(
        0, 255, 4000, dtype=np.uint8)))
    bad("garbage.jpg", "decode", "CorruptImageError")
    (lake / "empty.png").write_bytes(b"")
    bad("empty.png", "decode", "EmptyFileError")
    (lake / "text.png").write_text("this is not an image\n")
    bad("text.png", "decode", "NotAnImageError")
    _noise(30, 20).convert("CMYK").save(lake / "cmyk.jpg")
    ok("cmyk.jpg", (30, 20))
    ramp = (np.arange(32 * 24, dtype=np.uint16).reshape(24, 32) * 80).astype(np.uint16)
    Image.fromarray(ramp).save(lake / "gray16.png")
    ok("gray16.png", (32, 24))
    pal = _noise(24, 24).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(lake / "palette_alpha.png", transparency=0)
    ok("palette_alpha.png", (24, 24))
    rgba = _noise(20, 16).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(lake / "rgba.png")
    ok("rgba.png", (20, 16))
    Image.new("LA", (18, 12), (90, 60)).save(lake / "la.png")
    ok("la.png", (18, 12))
    _noise(33, 17).convert("1").save(lake / "onebit.png")
    ok("onebit.png", (33, 17))
    _noise(26, 14).convert("L").save(lake / "gray.jpg")
    ok("gray.jpg", (26, 14))
    frames = [Image.new("RGB", (20, 10), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(lake / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    ok("animated.gif", (20, 10))
    frames[0].save(lake / "multipage.tiff", save_all=True, append_images=frames[1:])
    ok("multipage.tiff", (20, 10))
    _noise(30, 22).save(lake / "image.webp")
    ok("image.webp", (30, 22))
    _noise(31, 23).save(lake / "image.bmp")
    ok("image.bmp", (31, 23))
    Image.fromarray(np.linspace(0, 3, 12 * 9, dtype=np.float32).reshape(9, 12), mode="F").save(
        lake / "float.tif")
    ok("float.tif", (12, 9))
    Image.new("RGB", (1, 1), (200, 10, 10)).save(lake / "one_by_one.png")
    ok("one_by_one.png", (1, 1))
    _noise(1, 3000).save(lake / "tall.png")
    ok("tall.png", (1, 3000))
    _noise(3000, 2).save(lake / "wide.png")
    ok("wide.png", (3000, 2))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # rotate 90 degrees clockwise to view
    _noise(80, 40).save(lake / "exif_rotated.jpg", exif=exif.tobytes(), quality=90)
    ok("exif_rotated.jpg", (40, 80))
    _noise(3000, 2000, seed=3).save(lake / "large.jpg", quality=80)
    ok("large.jpg", (3000, 2000))
    Image.new("1", (12000, 12000)).save(lake / "bomb.png")
    bad("bomb.png", "decode", "ImageTooLargeError")
    os.symlink(lake / "does-not-exist.jpg", lake / "broken_link.jpg")
    bad("broken_link.jpg", "read", "FileNotFoundError")
    _noise(21, 13).save(lake / "ñandú 图像.png")
    ok("ñandú 图像.png", (21, 13))
    _noise(64, 48).save(lake / "photo.heic", format="HEIF", quality=90)
    ok("photo.heic", (64, 48))
    # iPhone-style: stored sideways, with both HEIF's irot and EXIF orientation 6
    _noise(80, 40).save(lake / "IMG_0001.HEIC", format="HEIF", exif=exif.tobytes(), quality=90)
    ok("IMG_0001.HEIC", (40, 80))
    _noise(48, 32).save(lake / "image.heif", format="HEIF", quality=90)
    ok("image.heif", (48, 32))
    _noise(62, 46).save(lake / "image.avif", format="AVIF", quality=90)
    ok("image.avif", (62, 46))
    _noise(80, 40).save(lake / "exif_rotated.avif", format="AVIF", exif=exif.tobytes(), quality=90)
    ok("exif_rotated.avif", (40, 80))
    buf = io.BytesIO()
    _noise(200, 150).save(buf, format="HEIF", quality=90)
    (lake / "truncated.heic").write_bytes(buf.getvalue()[: buf.tell() * 2 // 3])
    bad("truncated.heic", "decode", "CorruptImageError")
    (lake / "notes.txt").write_text("not an image, skipped by extension\n")
    sub = lake / "nested" / "deeper"
    sub.mkdir(parents=True)
    _noise(15, 25).save(sub / "nested.jpeg")
    cases.append(Case("nested/deeper/nested.jpeg", sub / "nested.jpeg", size=(15, 25)))
    cases += write_hostile(lake, max_image_mb=ZOO_MAX_IMAGE_MB)
    return cases


ZOO_NON_IMAGES = 1  # notes.txt


# -- hostile files for the decoder policy (formats outside the allow-list, pixel bombs) ------

ZERO_BLOCK = 1 << 20  # zero bytes per repeated deflate segment of a blank PNG


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_blank_png(path: Path, width: int, height: int, *, bit_depth: int = 8) -> Path:
    """A valid grayscale PNG of all-zero pixels whose header says width x height, written
    without ever holding the image: the zlib body is one deflate segment of ZERO_BLOCK zero
    bytes, ended by a full flush (so it stands alone), repeated, then the rest and the
    Adler-32 of n zero bytes ((n mod 65521) << 16 | 1). 200 MP take ~200 KB and milliseconds."""
    raw = height * (1 + -(-width * bit_depth // 8))  # a filter byte (0) and the packed row
    segment = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = segment.compress(bytes(ZERO_BLOCK)) + segment.flush(zlib.Z_FULL_FLUSH)
    whole, rest = divmod(raw, ZERO_BLOCK)
    last = zlib.compressobj(9, zlib.DEFLATED, -15)
    tail = last.compress(bytes(rest)) + last.flush(zlib.Z_FINISH)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)))
        f.write(_png_chunk(b"IDAT", b"\x78\xda"))  # the zlib header
        for _ in range(whole):
            f.write(_png_chunk(b"IDAT", block))
        f.write(_png_chunk(b"IDAT", tail + struct.pack(">I", (raw % 65521) << 16 | 1)))
        f.write(_png_chunk(b"IEND", b""))
    return path


ALLOWED_NAMES = "allowed: JPEG, PNG, WebP, GIF, BMP, TIFF, HEIF, AVIF"


def write_hostile(root: Path, *, max_image_mb: float | None = None) -> list[Case]:
    """Files the decoder policy refuses, each with its expected error row: an EPS, a PDF
    and an SVG under image names (formats outside the allow-list: the name is never
    trusted), a 200 MP PNG (over Pillow's own ceiling), a PNG bomb (18 KB that would
    decode to 144 MP, over the default 100 MP limit) and, with `max_image_mb`, a valid BMP
    just over that byte cap."""
    root.mkdir(parents=True, exist_ok=True)
    cases = []

    def bad(name: str, error_type: str, *needles: str, stage: str = "decode") -> None:
        cases.append(Case(name, root / name, stage, error_type, needles=needles))

    Image.new("RGB", (16, 16), (200, 0, 0)).save(root / "eps_named.jpg", format="EPS")
    bad("eps_named.jpg", "NotAnImageError",
        "unsupported image format PostScript/EPS (first bytes b'%!PS-Adobe-3'); " + ALLOWED_NAMES)
    Image.new("RGB", (16, 16), (0, 200, 0)).save(root / "pdf_named.png", format="PDF")
    bad("pdf_named.png", "NotAnImageError", "unsupported image format PDF (first bytes b'%PDF-1.",
        ALLOWED_NAMES)
    (root / "svg_named.png").write_text('<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.'
                                        'org/2000/svg" width="16" height="16"><rect width="16" height="16"/>'
                                        '</svg>\n')
    bad("svg_named.png", "NotAnImageError",
        "unsupported image format SVG/XML (first bytes b'<?xml versio'); " + ALLOWED_NAMES)
    write_blank_png(root / "huge.png", 20_000, 10_000)
    bad("huge.png", "ImageTooLargeError", "200000000 pixels exceeds the limit of 100000000 (--max-pixels)")
    write_blank_png(root / "zip_bomb.png", 12_000, 12_000, bit_depth=1)
    bad("zip_bomb.png", "ImageTooLargeError",
        "12000x12000 = 144000000 pixels exceeds the limit of 100000000 (--max-pixels)")
    if max_image_mb is not None:
        side = int((max_image_mb * 2**20 / 3) ** 0.5) + 16  # BMP: 3 bytes a pixel, no compression
        Image.new("RGB", (side, side), (30, 60, 90)).save(root / "over_cap.bmp")
        size = (root / "over_cap.bmp").stat().st_size
        assert size > max_image_mb * 2**20, size
        bad("over_cap.bmp", "FileTooLargeError",
            f"the file is {size} bytes ({size / 2**20:.1f} MiB), over the cap of "
            f"{int(max_image_mb * 2**20)} bytes ({max_image_mb:g} MiB, --max-image-mb)", stage="read")
    return cases


def write_allowed(root: Path) -> dict[str, Path]:
    """One small valid image per allowed format: {format: path}; HEIF via pillow-heif,
    AVIF via Pillow's own plugin (both present in this environment)."""
    root.mkdir(parents=True, exist_ok=True)
    names = {"JPEG": "a.jpg", "PNG": "a.png", "WebP": "a.webp", "GIF": "a.gif", "BMP": "a.bmp",
             "TIFF": "a.tiff", "HEIF": "a.heic", "AVIF": "a.avif"}
    for n, (fmt, name) in enumerate(names.items()):
        _noise(40 + n, 30 + n, seed=10 + n).save(root / name, format=fmt.upper())
    return {fmt: root / name for fmt, name in names.items()}
