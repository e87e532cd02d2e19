"""decode_image on the bad-input zoo and on pixel-exact cases (no Ray)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from PIL import Image

from models import decode
from models.decode import (
    ALLOWED_FORMATS,
    IMAGE_EXTENSIONS,
    MISSING_CODECS,
    CorruptImageError,
    FileTooLargeError,
    ImageTooLargeError,
    NotAnImageError,
    UnsupportedFormatError,
    decode_image,
    max_image_bytes,
    probe_image,
    read_capped,
    read_file,
    target_size,
)
from tests.zoo import (
    ALLOWED_NAMES,
    EXIF_ORIENTATION,
    ZOO_MAX_IMAGE_MB,
    build_zoo,
    write_allowed,
    write_blank_png,
    write_hostile,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory):
    return build_zoo(tmp_path_factory.mktemp("zoo"))


def test_every_zoo_case_decodes_or_fails_as_expected(zoo) -> None:
    for case in zoo:
        if case.stage == "read":
            with pytest.raises(Exception) as info:
                read_file(case.path, max_image_bytes(ZOO_MAX_IMAGE_MB))
            assert type(info.value).__name__ == case.error_type, case.name
            assert all(n in str(info.value) for n in case.needles), (case.name, info.value)
            continue
        data = case.path.read_bytes()
        if case.stage == "decode":
            with pytest.raises(Exception) as info:
                decode_image(data, short=256, long=512)
            assert type(info.value).__name__ == case.error_type, case.name
            assert str(info.value) and "\n" not in str(info.value), case.name
            assert all(n in str(info.value) for n in case.needles), (case.name, info.value)
        else:
            dec = decode_image(data, short=256, long=512)
            assert (dec.width, dec.height) == case.size, case.name
            assert dec.pixels.dtype == np.uint8 and dec.pixels.ndim == 3, case.name
            assert dec.pixels.shape[2] == 3, case.name
            assert max(dec.pixels.shape[:2]) <= 512 and min(dec.pixels.shape[:2]) <= 256


def test_pixel_limit_is_configurable_and_checked_from_the_header(tmp_path: Path) -> None:
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    with pytest.raises(ImageTooLargeError, match="3072 pixels exceeds the limit of 3000"):
        decode_image(data, max_pixels=3000)
    assert decode_image(data, max_pixels=3072).width == 64


def test_exif_orientation_is_applied_to_pixels(tmp_path: Path) -> None:
    # A red left half, stored with orientation 6 (view rotated 90 degrees clockwise):
    # upright, the red half is on top.
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = (255, 0, 0)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.fromarray(arr).save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    dec = decode_image((tmp_path / "r.jpg").read_bytes())
    assert (dec.width, dec.height) == (40, 80)
    assert dec.pixels[:30, :, 0].mean() > 200 and dec.pixels[50:, :, 0].mean() < 50


def test_modes_convert_to_sensible_rgb(tmp_path: Path) -> None:
    gray16 = np.full((4, 4), 32768, np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    assert decode_image((tmp_path / "g16.png").read_bytes()).pixels.mean() == pytest.approx(128, abs=1)
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    assert decode_image((tmp_path / "clear.png").read_bytes()).pixels.min() == 255  # on white
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    first = decode_image((tmp_path / "anim.gif").read_bytes()).pixels
    assert first[..., 0].mean() > 200 and first[..., 2].mean() < 50


def test_large_jpeg_is_decoded_reduced_with_exact_scale(tmp_path: Path) -> None:
    Image.new("RGB", (2400, 1600), (10, 200, 30)).save(tmp_path / "big.jpg")
    dec = decode_image((tmp_path / "big.jpg").read_bytes(), short=200, long=400)
    assert dec.pixels.shape == (200, 300, 3)
    assert dec.scale == (8.0, 8.0)


@pytest.mark.parametrize(("size", "short", "long", "expected"), [
    ((1000, 500), 250, 1000, (500, 250)),
    ((1000, 500), 800, 1333, (1000, 500)),  # never enlarged
    ((1, 5000), 800, 1333, (1, 1333)),  # no side below one pixel
    ((4000, 3000), 800, 1000, (1000, 750)),  # the long side binds
])
def test_target_size(size, short, long, expected) -> None:
    assert target_size(*size, short, long) == expected


def _encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    if fmt == "HEIF":
        pillow_heif.from_pillow(im).save(buf, quality=90, **kw)
    else:
        im.save(buf, format=fmt, quality=90, **kw)
    return buf.getvalue()


def _red_left_half(w: int = 80, h: int = 40) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    return Image.fromarray(arr)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heic_and_avif_decode_to_size_and_colour(fmt: str) -> None:
    dec = decode_image(_encoded(Image.new("RGB", (96, 64), (200, 40, 90)), fmt))
    assert (dec.width, dec.height) == (96, 64) and dec.pixels.shape == (64, 96, 3)
    assert np.abs(dec.pixels.reshape(-1, 3).mean(0) - (200, 40, 90)).max() < 8


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heic_and_avif_reduced_decode(fmt: str) -> None:
    data = _encoded(Image.new("RGB", (640, 480), (20, 160, 220)), fmt)
    dec = decode_image(data, short=120, long=200)
    assert (dec.width, dec.height) == (640, 480)
    assert dec.pixels.shape == (120, 160, 3) and dec.scale == (4.0, 4.0)
    assert np.abs(dec.pixels.reshape(-1, 3).mean(0) - (20, 160, 220)).max() < 8


def test_heic_orientation_is_applied_once(tmp_path: Path) -> None:
    # Written like an iPhone photo: pixels stored sideways, pillow-heif turns EXIF orientation 6
    # into HEIF's irot/imir and keeps the EXIF tag; upright, the red half is on top.
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    path = tmp_path / "r.heic"
    pillow_heif.from_pillow(_red_left_half()).save(path, quality=90, exif=exif.tobytes())
    stored = Image.Exif()
    stored.load(pillow_heif.open_heif(path).info["exif"])
    assert stored[EXIF_ORIENTATION] == 6  # the file still says "rotate me"
    for short, long in ((None, None), (20, 40)):
        dec = decode_image(path.read_bytes(), short=short, long=long)
        assert (dec.width, dec.height) == (40, 80)
        h = dec.pixels.shape[0]
        assert dec.pixels.shape[1] * 2 == h
        assert dec.pixels[: h * 3 // 8, :, 0].mean() > 200 and dec.pixels[h * 5 // 8:, :, 0].mean() < 50


def test_avif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    dec = decode_image(_encoded(_red_left_half(), "AVIF", exif=exif.tobytes()))
    assert (dec.width, dec.height) == (40, 80)
    assert dec.pixels[:30, :, 0].mean() > 200 and dec.pixels[50:, :, 0].mean() < 50


def test_avif_with_a_generic_major_brand_is_not_taken_for_heic() -> None:
    data = _encoded(Image.new("RGB", (32, 24), (0, 0, 255)), "AVIF")
    data = data[:8] + b"mif1" + data[12:]  # valid ISO-BMFF; pillow-heif accepts it but lacks AV1
    assert decode._sniff(data) == "AVIF"
    assert decode_image(data).pixels[..., 2].mean() > 200


@pytest.mark.parametrize("keep", [0.002, 0.5, 0.99])
def test_truncated_heic_is_corrupt_not_unknown(keep: float) -> None:
    data = _encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 200, 3), np.uint8)),
                    "HEIF")
    with pytest.raises(CorruptImageError) as info:
        decode_image(data[: max(100, int(len(data) * keep))])
    assert "\n" not in str(info.value)
    if keep < 0.01:
        assert str(info.value) == "starts like a HEIF file but cannot be parsed"


@pytest.mark.parametrize(("head", "fmt"), [
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIF"),
    (b"\x00\x00\x00\x18ftypheix\x00\x00\x00\x00mif1heix", "HEIF"),
    (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1heic", "HEIF"),
    (b"\x00\x00\x00\x10ftypmsf1\x00\x00\x00\x00", "HEIF"),
    (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf", "AVIF"),
    (b"\x00\x00\x00\x14ftypavis\x00\x00\x00\x00avis", "AVIF"),
    (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1avif", "AVIF"),
    (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2", None),  # an MP4 video
    (b"\x00\x00\x00\x18ftypheic"[:10], None),  # too short to hold a brand
    (b"\xff\xd8\xff\xe0", "JPEG"),
    (b"hello world", None),
    (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "WebP"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt ", None),  # a RIFF that is not WebP: no plugin is tried
    (b"II+\x00\x08\x00\x00\x00", "TIFF"),  # BigTIFF
    (b"%!PS-Adobe-3.0 EPSF-3.0", None),
])
def test_sniff(head: bytes, fmt: str | None) -> None:
    assert decode._sniff(head) == fmt


def test_missing_codec_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    msg = "HEIC needs the pillow-heif package: pip install pillow-heif"
    monkeypatch.setitem(decode.MISSING_CODECS, "HEIF", msg)
    with pytest.raises(UnsupportedFormatError, match="pip install pillow-heif"):
        decode_image(_encoded(Image.new("RGB", (16, 16)), "HEIF"))


def test_without_pillow_heif_heic_is_unsupported_and_the_rest_still_decodes(tmp_path: Path) -> None:
    (tmp_path / "a.heic").write_bytes(_encoded(Image.new("RGB", (16, 16)), "HEIF"))
    Image.new("RGB", (5, 3)).save(tmp_path / "a.png")
    script = (
        "import sys; sys.modules['pillow_heif'] = None\n"  # makes `import pillow_heif` fail
        "from pathlib import Path\n"
        "from models.decode import MISSING_CODECS, UnsupportedFormatError, decode_image\n"
        "assert 'HEIF' in MISSING_CODECS, MISSING_CODECS\n"
        "assert decode_image(Path(sys.argv[1], 'a.png').read_bytes()).width == 5\n"
        "try:\n    decode_image(Path(sys.argv[1], 'a.heic').read_bytes())\n"
        "except UnsupportedFormatError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "HEIC needs the pillow-heif package: pip install pillow-heif"


def test_image_extensions_cover_the_zoo(zoo) -> None:
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".tif", ".tiff",
                                ".webp", ".heic", ".heif", ".avif"}
    for case in zoo:
        assert case.path.suffix.lower() in IMAGE_EXTENSIONS, case.name


# -- the decoder policy: allow-listed formats, pixel limits from the header, byte caps -----

@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory):
    return {c.name: c for c in write_hostile(tmp_path_factory.mktemp("hostile"))}


def test_files_outside_the_policy_are_refused_with_their_message(hostile) -> None:
    # The EPS is real: Pillow's scan of every plugin (formats=None) would take it (and hand
    # it to Ghostscript on load); the policy refuses it from its first bytes.
    with Image.open(hostile["eps_named.jpg"].path) as im:
        assert im.format == "EPS"
    assert set(hostile) == {"eps_named.jpg", "pdf_named.png", "svg_named.png", "huge.png", "zip_bomb.png"}
    for case in hostile.values():
        data = case.path.read_bytes()
        for call in (decode_image, probe_image):
            with pytest.raises(Exception) as info:
                call(data)
            assert type(info.value).__name__ == case.error_type, (case.name, info.value)
            message = str(info.value)
            assert "\n" not in message and all(n in message for n in case.needles), (case.name, message)


def test_the_bombs_are_small_files_that_fail_before_any_pixel_is_allocated(hostile, tmp_path: Path) -> None:
    """In a fresh process: peak RSS after refusing both PNGs is within a few MB of before,
    where decoding either would take >= 144 MB (Pillow holds a byte per pixel even for
    1-bit images) and its RGB conversion three times that."""
    bombs = [hostile["huge.png"].path, hostile["zip_bomb.png"].path]
    assert all(p.stat().st_size < 256 * 1024 for p in bombs)
    script = (
        "import resource, sys\n"
        "from models.decode import ImageTooLargeError, decode_image\n"
        "datas = [open(p, 'rb').read() for p in sys.argv[1:]]\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for data in datas:\n"
        "    try:\n        decode_image(data, short=256, long=512)\n"
        "    except ImageTooLargeError:\n        pass\n"
        "    else:\n        raise SystemExit('decoded a bomb')\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, *map(str, bombs)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    grew_kb = int(out.strip())
    assert grew_kb < 16 * 1024, f"peak RSS grew by {grew_kb} KiB"


def test_blank_png_helper_writes_a_valid_png(tmp_path: Path) -> None:
    """The bombs above are real PNGs: a small one of the same make decodes to zeros."""
    write_blank_png(tmp_path / "z.png", 3001, 777)
    with Image.open(tmp_path / "z.png") as im:
        im.load()
        assert im.size == (3001, 777) and not np.asarray(im).any()
    dec = decode_image((tmp_path / "z.png").read_bytes())
    assert (dec.width, dec.height) == (3001, 777) and dec.pixels.max() == 0


@pytest.mark.parametrize("fmt", list(ALLOWED_FORMATS))
def test_every_allowed_format_still_decodes(fmt: str, tmp_path: Path) -> None:
    if fmt in MISSING_CODECS:
        pytest.skip(f"this environment cannot write or read {fmt}: {MISSING_CODECS[fmt]}")
    path = write_allowed(tmp_path)[fmt]
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB"), np.int16)
    assert probe_image(path.read_bytes()) == expected.shape[1::-1]
    dec = decode_image(path.read_bytes())
    assert dec.pixels.shape == expected.shape and (dec.width, dec.height) == expected.shape[1::-1]
    assert np.abs(dec.pixels.astype(np.int16) - expected).mean() < 1  # the same pixels as Pillow's


def test_message_names_what_the_bytes_look_like() -> None:
    for data, name in ((b"8BPS\x00\x01" + bytes(30), "PSD"), (b"\x00\x00\x00\x0cjP  \r\n", "JPEG 2000"),
                       (b"\xef\xbb\xbf  <svg width='1'/>", "SVG/XML"), (b"just text", None)):
        with pytest.raises(NotAnImageError) as info:
            decode_image(data)
        head = f"unsupported image format {name} (" if name else "unsupported image format (first bytes"
        assert str(info.value).startswith(head) and str(info.value).endswith(ALLOWED_NAMES), info.value


def test_pillows_ceiling_is_reported_when_it_is_below_max_pixels(hostile) -> None:
    huge = hostile["huge.png"].path.read_bytes()
    pattern = r"Image size \(200000000 pixels\) exceeds limit of \d+ pixels.*\(Pillow's limit, PIL"
    with pytest.raises(ImageTooLargeError, match=pattern):
        decode_image(huge, max_pixels=300_000_000)


def test_byte_cap_is_checked_from_the_size_and_never_read_past(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 40)  # 10240 bytes
    assert read_file(path, 10240) == path.read_bytes() and read_file(path, None) == path.read_bytes()
    with pytest.raises(FileTooLargeError, match=r"^the file is 10240 bytes \(0.0 MiB\), over the cap of "
                                                r"10239 bytes \(0.00976467 MiB, --max-image-mb\)$"):
        read_file(path, 10239)
    # A stream that does not say its size (or lied about it) is read to cap + 1 bytes, no further.
    stream = io.BytesIO(path.read_bytes())
    with pytest.raises(FileTooLargeError, match="the file is more than 4096 bytes"):
        read_capped(stream, 4096)
    assert stream.tell() == 4097
    stream = io.BytesIO(path.read_bytes())
    with pytest.raises(FileTooLargeError):
        read_capped(stream, 4096, size=100)
    assert stream.tell() == 4097
    assert read_capped(io.BytesIO(b"abc"), 3) == b"abc"


def test_training_images_are_read_under_the_decoder_policy(tmp_path: Path) -> None:
    """Training sets read their images through the same one-plugin policy as annotate: a
    file Pillow's scan of every plugin would open (a TGA) stops training in one line."""
    from models.errors import LakelensError
    from pipelines.train.datasets import read_rgb

    Image.new("RGB", (8, 6), (200, 10, 10)).save(tmp_path / "ok.png")
    assert read_rgb(tmp_path / "ok.png").shape == (6, 8, 3)
    Image.new("RGB", (8, 6)).save(tmp_path / "sneaky.jpg", format="TGA")
    with Image.open(tmp_path / "sneaky.jpg") as im:  # Pillow's plugin scan would take it
        assert im.format == "TGA"
    with pytest.raises(LakelensError, match="cannot read training image .*sneaky.jpg"):
        read_rgb(tmp_path / "sneaky.jpg")
