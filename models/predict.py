"""Predictors: a model loaded once, called on lists of decoded images. No Ray here.

Images are uint8 [H, W, 3] RGB arrays, already upright. Outputs are in the pixels of
the image given; mapping back to original pixels is the caller's (pipelines.encode).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.detection import build_detector
from models.device import autocast, is_out_of_memory, pick_device, release_memory
from models.embedding import build_embedder, preprocess
from models.semantic import SemanticPredictor

logger = logging.getLogger(__name__)

MASK_MARGIN = 0.1  # torchvision pastes masks into a box grown by (M+2)/M (~7 %); crop wider


def _to_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [H, W, 3] -> uint8 [3, H, W] on `device` (the cast to float happens there)."""
    if not image.flags.writeable or not image.flags.c_contiguous:
        image = np.array(image, order="C")  # torch refuses read-only views (Arrow buffers)
    t = torch.from_numpy(image).permute(2, 0, 1)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t


class DetectionPredictor:
    """A torchvision R-CNN (detect, segment or pose) on decoded images.

    __call__(images) -> one dict per image:
      boxes float32[N, 4] xyxy, labels int64[N], scores float32[N];
      segment: mask_crops list of (top, left, float32[h, w] probabilities) on the model's
        input grid, and mask_grid (sx, sy) from that grid to the given image;
      pose: keypoints float32[N, K, 3] (x, y, visibility).
    """

    def __init__(self, arch: str, *, weights: str, image_size: int | None = None,
                 score_threshold: float = 0.5, device: str | None = None, max_batch: int = 8):
        self.device = pick_device(device)
        self.model, self.info = build_detector(
            arch, weights=weights, image_size=image_size, score_threshold=score_threshold)
        self.model.to(self.device)
        self.task = self.info.task
        self.max_batch = max_batch
        self.min_size, self.max_size = self.info.input_size
        # label 0 is the background in every lakelens label list: never a detection
        self.drop_background = bool(self.info.labels) and self.info.labels[0] == "__background__"

    def __call__(self, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for i in range(0, len(images), self.max_batch):
            out += self._forward(images[i:i + self.max_batch])
        return out

    def _fit(self, t: torch.Tensor) -> tuple[torch.Tensor, tuple[float, float]]:
        """Resize to the model's input size ourselves, keeping every side >= 1 pixel
        (torchvision's own resize rounds a 1x3000 image to width 0 and fails), so the
        model's resize is an identity. Returns the tensor and (sx, sy) back to `t`."""
        h, w = t.shape[-2:]
        s = min(self.min_size / min(h, w), self.max_size / max(h, w))
        th, tw = max(1, round(h * s)), max(1, round(w * s))
        if (th, tw) == (h, w):
            return t, (1.0, 1.0)
        t = F.interpolate(t[None], size=(th, tw), mode="bilinear", align_corners=False,
                          antialias=s < 1)[0]
        return t, (w / tw, h / th)

    def _forward(self, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        fitted = [self._fit(_to_tensor(im, self.device).float().div_(255.0)) for im in images]
        with torch.inference_mode(), autocast(self.device):
            raw = self.model([t for t, _ in fitted])
        return [self._to_numpy(r, grid) for r, (_, grid) in zip(raw, fitted, strict=True)]

    def _to_numpy(self, r: dict[str, torch.Tensor], grid: tuple[float, float]) -> dict[str, Any]:
        if self.drop_background:  # RetinaNet / FCOS score class 0 like any other
            keep = r["labels"] != 0
            if not bool(keep.all()):
                r = {k: v[keep] for k, v in r.items()}
        sx, sy = grid
        scale = torch.tensor([sx, sy, sx, sy], device=r["boxes"].device)
        out: dict[str, Any] = {
            "boxes": (r["boxes"].float() * scale).cpu().numpy(),
            "labels": r["labels"].cpu().numpy(),
            "scores": r["scores"].float().cpu().numpy(),
        }
        if "masks" in r:
            out["mask_crops"] = _mask_crops(r["masks"][:, 0], r["boxes"])
            out["mask_grid"] = grid
        if "keypoints" in r:
            kp = r["keypoints"].float().cpu().numpy()
            kp[..., 0] *= sx
            kp[..., 1] *= sy
            out["keypoints"] = kp
        return out


def _mask_crops(masks: torch.Tensor, boxes: torch.Tensor) -> list[tuple[int, int, np.ndarray]]:
    """Crop each full-image probability map to its (grown) box before leaving the device."""
    h, w = masks.shape[-2:]
    crops = []
    for m, (x0, y0, x1, y1) in zip(masks, boxes.float().tolist(), strict=True):
        gx, gy = (x1 - x0) * MASK_MARGIN + 1, (y1 - y0) * MASK_MARGIN + 1
        top, left = max(0, int(y0 - gy)), max(0, int(x0 - gx))
        bottom, right = min(h, int(y1 + gy) + 1), min(w, int(x1 + gx) + 1)
        crops.append((top, left, m[top:bottom, left:right].float().cpu().numpy()))
    return crops


class EmbeddingPredictor:
    """An embedder on decoded images: __call__(images) -> float32[N, dim], unit norm."""

    def __init__(self, arch: str, *, weights: str, device: str | None = None,
                 max_batch: int = 32):
        self.device = pick_device(device)
        self.model, self.info, self.crop = build_embedder(arch, weights=weights)
        self.model.to(self.device)
        # NHWC on CUDA: cuDNN's fast convolution kernels (tensor cores) take it directly
        self.channels_last = self.device.type == "cuda"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.task = "embed"
        self.max_batch = max_batch

    def __call__(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for i in range(0, len(images), self.max_batch):
            chunk = [_to_tensor(im, self.device) for im in images[i:i + self.max_batch]]
            x = preprocess(chunk, self.crop)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), autocast(self.device):
                emb = self.model(x)
            out += list(emb.float().cpu().numpy())
        return out


Predictor = DetectionPredictor | EmbeddingPredictor | SemanticPredictor


def predict_each(predictor: Predictor, images: Sequence[np.ndarray]) -> list[Any]:
    """Run `predictor` on the batch; if the batch fails, retry image by image.

    Returns one entry per image: its output, or the exception that image raised.
    An out-of-memory failure also halves the predictor's sub-batch size for later calls.
    """
    return _each(predictor, images, predictor.device)


def _each(fn: Callable[[Sequence[Any]], list[Any]], items: Sequence[Any],
          device: torch.device) -> list[Any]:
    try:
        return fn(items)
    except Exception as e:  # one bad image must not sink the batch
        release_memory(device)
        if is_out_of_memory(e) and getattr(fn, "max_batch", 1) > 1:
            fn.max_batch = max(1, fn.max_batch // 2)
            logger.warning("out of memory on a batch of %d; sub-batch now %d", len(items),
                           fn.max_batch)
        if len(items) == 1:
            return [e]
        logger.warning("batch of %d failed (%s: %s); retrying image by image",
                       len(items), type(e).__name__, e)
    results: list[Any] = []
    for item in items:
        try:
            results += fn([item])
        except Exception as e:
            release_memory(device)
            results.append(e)
    return results
