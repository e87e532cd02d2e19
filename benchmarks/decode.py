"""Decode throughput on one core: lakelens's decode_image vs plain PIL, 12-MP JPEGs to 800 px.

The images: --images synthetic 4000x3000 JPEGs (quality 90) with photo-like content
(gradients, texture, sensor noise), different per image. The baseline is what a user
writes: `Image.open(f).convert("RGB").resize((800, 600))` (a full decode, Pillow's
default resampling) then `np.asarray`. lakelens: `decode_image(data, long=800)` (reads
the header, decodes at a reduced DCT scale, EXIF orientation, one bilinear resize, the
same uint8 array out). Both in this one process, one thread, the same bytes from memory,
measured alternately so the machine's state treats them alike.

Usage: python benchmarks/decode.py [--images 12] [--rounds 3] [--quick]
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time

import numpy as np
from PIL import Image

from models.decode import decode_image

WIDTH, HEIGHT, LONG = 4000, 3000, 800


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    out = []
    for _ in range(n):
        fx, fy = rng.uniform(40, 400, 2)
        base = np.stack([(np.sin(x / fx) + np.cos(y / fy)) * 60 + 128,
                         (x / WIDTH) * rng.uniform(100, 255), (y / HEIGHT) * rng.uniform(100, 255)], -1)
        base += rng.normal(0, rng.uniform(4, 16), base.shape).astype(np.float32)
        buf = io.BytesIO()
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def plain(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    s = LONG / max(w, h)
    return np.asarray(im.resize((round(w * s), round(h * s))))


def lakelens(data: bytes) -> np.ndarray:
    return decode_image(data, long=LONG).pixels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="CI sizes: 3 images, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.rounds = 3, 1
    jpegs = make_jpegs(args.images)
    assert plain(jpegs[0]).shape == lakelens(jpegs[0]).shape  # the same output size
    seconds = {"plain": 0.0, "lakelens": 0.0}
    for _ in range(args.rounds):
        for name, fn in (("plain", plain), ("lakelens", lakelens)):
            start = time.perf_counter()
            for data in jpegs:
                fn(data)
            seconds[name] += time.perf_counter() - start
    n = args.images * args.rounds
    rates = {k: n / v for k, v in seconds.items()}
    print(f"plain PIL full decode + resize: {rates['plain']:.2f} images/s; lakelens decode_image: "
          f"{rates['lakelens']:.2f} images/s (one core)", flush=True)
    print(json.dumps({"bench": "decode", "images": args.images, "rounds": args.rounds,
                      "source": f"{WIDTH}x{HEIGHT} JPEG q90", "long_side": LONG,
                      "mean_jpeg_bytes": int(np.mean([len(j) for j in jpegs])),
                      "plain_images_per_s": round(rates["plain"], 2),
                      "lakelens_images_per_s": round(rates["lakelens"], 2),
                      "ratio": round(rates["lakelens"] / rates["plain"], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
