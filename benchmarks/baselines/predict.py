"""The model step both baselines share, written as a user writes it from the docs: a
callable class that builds the model once and maps a list of decoded images (uint8
[H, W, 3] RGB arrays) to plain columns. It knows nothing of Ray or Daft.

The models are lakelens's builders with seeded "random" weights, so every pipeline runs
the same network; the preprocessing is torchvision's presets (the detectors carry their
own); masks are RLE-encoded with pycocotools, embeddings are lists of floats.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import numpy as np
import pyarrow as pa
import torch

TASKS = ("detect", "segment", "embed", "semantic")
_BOXES = [pa.field("boxes", pa.list_(pa.list_(pa.float64()))), pa.field("scores", pa.list_(pa.float64())),
          pa.field("labels", pa.list_(pa.int64()))]
_STAMPS = [pa.field("t", pa.float64(), metadata={"unit": "epoch seconds, when the batch was done"}),
           pa.field("pid", pa.int64()), pa.field("tid", pa.int64())]


def output_schema(task: str) -> pa.Schema:
    """The columns `DocsPredictor.__call__` returns for `task` (the path column aside)."""
    fields = {"detect": _BOXES, "segment": [*_BOXES, pa.field("masks", pa.list_(pa.string()))],
              "embed": [pa.field("embedding", pa.list_(pa.float64()))],
              "semantic": [pa.field("semantic", pa.list_(pa.string()))]}[task]
    return pa.schema([*fields, *_STAMPS])


class DocsPredictor:
    """Build the model once (one torch thread: the engines run one instance per CPU);
    predict a batch of decoded images."""

    def __init__(self, task: str, arch: str, image_size: int, score_threshold: float):
        torch.set_num_threads(1)
        self.task = task
        if task == "embed":
            from torchvision.transforms import v2

            from models.embedding import build_embedder

            self.model = build_embedder(arch, weights="random")[0].eval()
            self.transform = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224),
                                         v2.ToDtype(torch.float32, scale=True),
                                         v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        elif task == "semantic":  # torchvision's SemanticSegmentation preset at image_size
            from torchvision.transforms import v2

            from models.semantic import build_semantic

            self.model = build_semantic(arch, weights="random")[0].eval()
            self.transform = v2.Compose([v2.Resize(image_size, antialias=True),
                                         v2.ToDtype(torch.float32, scale=True),
                                         v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        else:
            from models.detection import build_detector

            self.model = build_detector(arch, weights="random", image_size=image_size)[0].eval()
            self.model.roi_heads.score_thresh = score_threshold

    def __call__(self, images: list[np.ndarray]) -> dict[str, list]:
        """Columns of `output_schema(task)`, one value per image, in order."""
        from pycocotools import mask as mask_utils

        tensors = [torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1) for x in images]
        out: dict[str, list] = {}
        with torch.inference_mode():
            if self.task == "embed":
                x = torch.stack([self.transform(im) for im in tensors])
                out["embedding"] = [e.tolist() for e in self.model(x)]
            elif self.task == "semantic":  # one image at a time: the sizes differ
                out["semantic"] = []
                for im in tensors:
                    logits = self.model(self.transform(im)[None])["out"]
                    classes = torch.nn.functional.interpolate(
                        logits.argmax(1, keepdim=True).float(), size=im.shape[-2:],
                        mode="nearest")[0, 0].to(torch.uint8).numpy()
                    out["semantic"].append([
                        json.dumps({"label": int(c), "counts": mask_utils.encode(
                            np.asfortranarray(classes == c, dtype=np.uint8))["counts"].decode()})
                        for c in np.unique(classes) if c != 0])
            else:
                preds = self.model([im.float() / 255 for im in tensors])
                out["boxes"] = [p["boxes"].double().numpy().tolist() for p in preds]
                out["scores"] = [p["scores"].double().numpy().tolist() for p in preds]
                out["labels"] = [p["labels"].numpy().tolist() for p in preds]
                if self.task == "segment":
                    out["masks"] = [
                        [json.dumps({"size": r["size"], "counts": r["counts"].decode()})
                         for r in mask_utils.encode(np.asfortranarray(
                             (p["masks"][:, 0] > 0.5).numpy().transpose(1, 2, 0).astype(np.uint8)))]
                        for p in preds]
        n = len(images)
        out.update(t=[time.time()] * n, pid=[os.getpid()] * n, tid=[threading.get_ident()] * n)
        return out


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The baseline scripts' shared command line: IMAGES_DIR OUT --task --arch --cpus ..."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("images")
    p.add_argument("out")
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--arch", required=True)
    p.add_argument("--cpus", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=320)
    p.add_argument("--score-threshold", type=float, default=0.0)
    return p.parse_args(argv)
