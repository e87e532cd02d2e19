"""The bad-input zoo: files that a real image lake holds, each with its exact outcome."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pillow_heif
from PIL import Image

pillow_heif.register_heif_opener()  # lets Image.save write format="HEIF"

EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    stage: str | None = None  # None: a result row; else the error row's stage
    error_type: str | None = None
    size: tuple[int, int] | None = None  # upright (width, height) of a result row


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
    return cases


ZOO_NON_IMAGES = 1  # notes.txt
