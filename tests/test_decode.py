"""decode_image on the bad-input zoo and on pixel-exact cases (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.decode import ImageTooLargeError, decode_image, target_size
from tests.zoo import EXIF_ORIENTATION, build_zoo


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory):
    return build_zoo(tmp_path_factory.mktemp("zoo"))


def test_every_zoo_case_decodes_or_fails_as_expected(zoo) -> None:
    for case in zoo:
        if case.stage == "read":
            with pytest.raises(FileNotFoundError):
                case.path.read_bytes()
            continue
        data = case.path.read_bytes()
        if case.stage == "decode":
            with pytest.raises(Exception) as info:
                decode_image(data, short=256, long=512)
            assert type(info.value).__name__ == case.error_type, case.name
            assert str(info.value) and "\n" not in str(info.value), case.name
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
