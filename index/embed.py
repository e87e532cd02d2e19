"""Embed query image files with the embedder an index was built from."""

from __future__ import annotations

import logging

import numpy as np

from models import weights as W
from models.decode import DEFAULT_MAX_IMAGE_MB, decode_image, max_image_bytes, read_file
from models.embedding import EMBED_ARCHS
from models.embedding import decode_sizes as embed_decode_sizes
from models.errors import LakelensError

logger = logging.getLogger(__name__)


def weights_spec(embedder: dict, override: str | None = None) -> str:
    """The spec that rebuilds the index's embedder: random, default or its checkpoint,
    whose content must still hash to the id the index recorded."""
    wid = embedder["weights"]
    if wid.startswith("random:"):
        return W.RANDOM
    if wid.startswith("default:"):
        published = EMBED_ARCHS[embedder["arch"]].published
        if published is not None:
            W.ensure_default_available(published.url, what=f"embed ({embedder['arch']})")
        return W.DEFAULT
    spec = override or embedder.get("spec")
    if not spec or spec in (W.DEFAULT, W.RANDOM):
        raise LakelensError(f"the index was built with checkpoint {wid}; pass its path with --weights")
    W.validate_spec(spec, what="embedder checkpoint")
    found = W.read_checkpoint(spec).weights_id
    if found != wid:
        raise LakelensError(f"checkpoint {spec!r} is {found}, but the index was built with {wid}; "
                            "pass the right one with --weights")
    return spec


def embed_files(paths: list[str], embedder: dict, *, weights: str | None = None,
                max_image_mb: float | None = None) -> np.ndarray:
    """float32[len(paths), dim]. An unreadable image (missing, over `max_image_mb` MiB, a
    format outside models.decode.ALLOWED_FORMATS, too many pixels) is a LakelensError
    naming it."""
    from models.predict import EmbeddingPredictor

    if not paths:
        raise LakelensError("no query images given")
    arch = embedder["arch"]
    predictor = EmbeddingPredictor(arch, weights=weights_spec(embedder, weights))
    cap = max_image_bytes(DEFAULT_MAX_IMAGE_MB if max_image_mb is None else max_image_mb)
    short, long = embed_decode_sizes(arch)
    images = []
    for path in paths:
        try:
            images.append(decode_image(read_file(path, cap), short=short, long=long).pixels)
        except (OSError, ValueError) as e:
            raise LakelensError(f"cannot read query image {path!r}: {type(e).__name__}: {e}") from e
    return np.stack(predictor(images)).astype(np.float32)
