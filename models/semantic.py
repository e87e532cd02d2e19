"""Semantic segmentation: a class for every pixel. torchvision's FCN, DeepLabV3 (atrous
convolution and ASPP) and LR-ASPP with their published weights, and a small U-Net
(encoder-decoder with skip connections, Ronneberger et al. 2015) for CPU runs, tests and
training from scratch, and DeepLabV3's ASPP head on a small CNN (`deeplabv3_tiny`). No Ray here.

Every model maps float[N, 3, H, W] (ImageNet-normalised) to {"out": logits[N, C, H, W]}
at the input's resolution; class 0 is the background.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import segmentation as tvs
from torchvision.models._api import WeightsEnum

from models import weights as W
from models.device import autocast, pick_device
from models.embedding import IMAGENET_MEAN, IMAGENET_STD
from models.errors import LakelensError
from models.info import ModelInfo, check_arch_in

logger = logging.getLogger(__name__)

VOC_LABELS: tuple[str, ...] = tuple(tvs.DeepLabV3_ResNet50_Weights.DEFAULT.meta["categories"])
IGNORE = 255  # label-map value for "not scored" (COCO crowd regions, crop padding)
PAD_TO = 32  # inputs are padded to a multiple of this (the deepest stride of any arch)


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(8, cout),
                         nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                         nn.GroupNorm(8, cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """A small U-Net: three down stages (max-pool), a bottleneck, three up stages
    (transposed conv, concatenated with the encoder's skip), a 1x1 classifier."""

    def __init__(self, num_classes: int = len(VOC_LABELS), widths: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        self.down = nn.ModuleList()
        cin = 3
        for w in widths[:-1]:
            self.down.append(_Block(cin, w))
            cin = w
        self.bottom = _Block(widths[-2], widths[-1])
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w_in, w_out in zip(widths[:0:-1], widths[-2::-1], strict=True):
            self.up.append(nn.ConvTranspose2d(w_in, w_out, 2, stride=2))
            self.merge.append(_Block(2 * w_out, w_out))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips), strict=True):
            x = up(x)
            if x.shape[-2:] != skip.shape[-2:]:  # odd sizes: align to the skip
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = merge(torch.cat([x, skip], dim=1))
        out = self.head(x)
        if out.shape[-2:] != size:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return {"out": out}


def unet_tiny(*, num_classes: int = len(VOC_LABELS), **_: object) -> UNet:
    return UNet(num_classes)


class _TinyStride8(nn.Module):
    """Three stride-2 conv stages (output stride 8, 96 channels) returning {"out": ...}
    as torchvision's segmentation backbones do."""

    def __init__(self, channels: Sequence[int] = (32, 64, 96)):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout in channels:
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.GroupNorm(8, cout),
                       nn.ReLU(inplace=True), _Block(cout, cout)]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.body(x)}


def deeplabv3_tiny(*, num_classes: int = len(VOC_LABELS), **_: object) -> tvs.DeepLabV3:
    """torchvision's DeepLabV3 head (ASPP: atrous convolutions at rates 2, 4, 6 and image
    pooling) on a small stride-8 CNN: the seeds' DeepLab, trainable on a CPU."""
    backbone = _TinyStride8()
    return tvs.DeepLabV3(backbone, tvs.deeplabv3.DeepLabHead(backbone.out_channels, num_classes,
                                                           atrous_rates=(2, 4, 6)))


@dataclass(frozen=True)
class SemanticArch:
    builder: Callable[..., nn.Module]
    published: WeightsEnum | None  # torchvision's published weights; None for unet_tiny
    min_size: int  # shorter side the model sees by default (torchvision's eval resize)
    max_size: int
    heads: tuple[str, ...]  # the final classifier convs (module paths): class count, fine-tuning


_DEEPLAB_HEAD = ("classifier.4",)
SEMANTIC_ARCHS: dict[str, SemanticArch] = {
    "deeplabv3_resnet50": SemanticArch(tvs.deeplabv3_resnet50,
                                       tvs.DeepLabV3_ResNet50_Weights.DEFAULT, 520, 1040, _DEEPLAB_HEAD),
    "deeplabv3_resnet101": SemanticArch(tvs.deeplabv3_resnet101,
                                        tvs.DeepLabV3_ResNet101_Weights.DEFAULT, 520, 1040, _DEEPLAB_HEAD),
    "deeplabv3_mobilenet_v3_large": SemanticArch(
        tvs.deeplabv3_mobilenet_v3_large, tvs.DeepLabV3_MobileNet_V3_Large_Weights.DEFAULT, 520,
        1040, _DEEPLAB_HEAD),
    "fcn_resnet50": SemanticArch(tvs.fcn_resnet50, tvs.FCN_ResNet50_Weights.DEFAULT, 520, 1040,
                                 _DEEPLAB_HEAD),
    "lraspp_mobilenet_v3_large": SemanticArch(
        tvs.lraspp_mobilenet_v3_large, tvs.LRASPP_MobileNet_V3_Large_Weights.DEFAULT, 520, 1040,
        ("classifier.high_classifier", "classifier.low_classifier")),
    "unet_tiny": SemanticArch(unet_tiny, None, 128, 512, ("head",)),
    "deeplabv3_tiny": SemanticArch(deeplabv3_tiny, None, 128, 512, _DEEPLAB_HEAD),
}


def input_sizes(arch: str, image_size: int | None = None) -> tuple[int, int]:
    """(shorter, longer) side the model sees: `image_size` as the shorter side (the longer
    capped at twice it), else the arch's own."""
    spec = SEMANTIC_ARCHS[arch]
    if image_size is None:
        return spec.min_size, spec.max_size
    return image_size, 2 * image_size


def _untrained(arch: str, num_classes: int, aux: bool = False) -> nn.Module:
    spec = SEMANTIC_ARCHS[arch]
    if spec.published is None:
        return spec.builder(num_classes=num_classes)
    kwargs: dict = {"weights": None, "weights_backbone": None, "num_classes": num_classes}
    if arch != "lraspp_mobilenet_v3_large":  # LR-ASPP has no auxiliary head
        kwargs["aux_loss"] = aux
    return spec.builder(**kwargs)


def _drop_aux(model: nn.Module) -> nn.Module:
    """FCN/DeepLab's auxiliary classifier only serves training: not run at inference."""
    if getattr(model, "aux_classifier", None) is not None:
        model.aux_classifier = None
    return model


def _classes_in(state_dict: dict[str, torch.Tensor], arch: str) -> int:
    key = SEMANTIC_ARCHS[arch].heads[0] + ".weight"
    if key not in state_dict:
        raise LakelensError(f"checkpoint has no {key!r}: it is not a {arch} model")
    return int(state_dict[key].shape[0])


def build_semantic(arch: str, *, weights: str, image_size: int | None = None) -> tuple[nn.Module, ModelInfo]:
    """A semantic segmentation model in eval mode and what it says about itself."""
    check_arch_in("semantic", arch, SEMANTIC_ARCHS)
    spec = SEMANTIC_ARCHS[arch]
    if weights == W.DEFAULT:
        if spec.published is None:
            raise LakelensError(f"semantic arch {arch!r} has no published weights; use --weights "
                                "semantic=random or a checkpoint")
        model = spec.builder(weights=spec.published, progress=False)
        labels = tuple(spec.published.meta["categories"])
        weights_id = f"default:{type(spec.published).__name__}.{spec.published.name}"
    elif weights == W.RANDOM:
        with W.seeded():
            model = _untrained(arch, len(VOC_LABELS))
        labels, weights_id = VOC_LABELS, f"random:seed{W.RANDOM_SEED}"
    else:
        ckpt = W.read_for(weights, task="semantic", arch=arch)
        n = _classes_in(ckpt.state_dict, arch)
        aux = any(k.startswith("aux_classifier.") for k in ckpt.state_dict)
        model = _untrained(arch, n, aux=aux)
        W.load_into(model, ckpt, spec=weights, arch=arch)
        labels = tuple(ckpt.meta.get("labels") or ("__background__", *(f"class_{i}" for i in range(1, n))))
        if len(labels) != n:
            raise LakelensError(f"checkpoint {weights!r} names {len(labels)} labels for {n} classes")
        weights_id = ckpt.weights_id
        image_size = image_size or ckpt.meta.get("image_size")
    model = _drop_aux(model).eval()
    info = ModelInfo(task="semantic", arch=arch, weights=weights, weights_id=weights_id,
                     labels=labels, input_size=input_sizes(arch, image_size))
    return model, info


def _module(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, name = path.rpartition(".")
    return (model.get_submodule(parent) if parent else model), name


def build_for_training(arch: str, *, init: str, num_classes: int, seed: int = 0,
                       image_size: int | None = None) -> tuple[nn.Module, ModelInfo]:
    """A model to train, in train mode: `init` weights (default, random or a checkpoint)
    with the final classifier conv(s) replaced (seeded) when the class count differs."""
    model, info = build_semantic(arch, weights=init, image_size=image_size)
    for path in SEMANTIC_ARCHS[arch].heads:
        parent, name = _module(model, path)
        old = getattr(parent, name)
        if old.out_channels != num_classes:
            with W.seeded(seed):
                setattr(parent, name, nn.Conv2d(old.in_channels, num_classes, 1))
    return model.train(), info


def standardise(x: torch.Tensor) -> torch.Tensor:
    """float [3, h, w] in [0, 1] -> ImageNet-normalised, as every model here expects."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def fit(image: np.ndarray, min_size: int, max_size: int, device: torch.device) -> torch.Tensor:
    """uint8 [h, w, 3] -> float [3, h', w'] in [0, 1] on `device`, the shorter side at
    `min_size` unless the longer would pass `max_size` (every side >= 1 pixel)."""
    if not image.flags.writeable or not image.flags.c_contiguous:
        image = np.array(image, order="C")  # torch refuses read-only views (Arrow buffers)
    t = torch.from_numpy(image).to(device).permute(2, 0, 1).float().div_(255.0)
    h, w = t.shape[-2:]
    s = min(min_size / min(h, w), max_size / max(h, w))
    th, tw = max(1, round(h * s)), max(1, round(w * s))
    if (th, tw) != (h, w):
        t = F.interpolate(t[None], size=(th, tw), mode="bilinear", align_corners=False,
                          antialias=s < 1)[0]
    return t


def normalise(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """float [3, h, w] tensors in [0, 1] -> one ImageNet-normalised batch, zero-padded
    (after normalising) at the bottom/right to a common multiple of PAD_TO; and each
    image's (h, w) in it."""
    device = images[0].device
    sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in images]
    ph = -(-max(h for h, _ in sizes) // PAD_TO) * PAD_TO
    pw = -(-max(w for _, w in sizes) // PAD_TO) * PAD_TO
    batch = torch.zeros((len(images), 3, ph, pw), device=device)
    for i, (t, (h, w)) in enumerate(zip(images, sizes, strict=True)):
        batch[i, :, :h, :w] = standardise(t)
    return batch, sizes


def head_logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The model's class logits [B, C, gh, gw] on its head's own grid: torchvision's FCN,
    DeepLabV3 and LR-ASPP upsample theirs to the input size (bilinear, every class) inside
    forward(); skipping that, the argmax and its score cost 1/stride^2 as much and the class
    map is resized once, to the image (resize_nearest). Other models: their own output."""
    if isinstance(model, (tvs.FCN, tvs.DeepLabV3)):
        return model.classifier(model.backbone(batch)["out"])
    if isinstance(model, tvs.LRASPP):
        return model.classifier(model.backbone(batch))
    return model(batch)["out"]


def on_grid(size: tuple[int, int], batch_size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """An image of `size` (h, w) at the top left of a padded batch of `batch_size`: the
    cells of the head's `grid` that cover it (every pixel of it, at least one cell)."""
    (h, w), (ph, pw), (gh, gw) = size, batch_size, grid
    return max(1, min(gh, -(-h * gh // ph))), max(1, min(gw, -(-w * gw // pw)))


def classes_and_scores(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cell: the argmax class and its softmax probability, exp(max - logsumexp): no
    softmax tensor over every class."""
    logits = logits.float()
    top, classes = logits.max(dim=1)
    return classes, (top - torch.logsumexp(logits, dim=1)).exp_()


class SemanticPredictor:
    """A semantic model on decoded images. __call__(images) -> one dict per image:
    classes uint8/int16 [gh, gw] (argmax) and scores float16 [gh, gw] (its softmax
    probability), on the model head's grid over the whole image (see head_logits)."""

    def __init__(self, arch: str, *, weights: str, image_size: int | None = None,
                 device: str | None = None, max_batch: int = 8):
        self.device = pick_device(device)
        self.model, self.info = build_semantic(arch, weights=weights, image_size=image_size)
        self.model.to(self.device)
        self.task = "semantic"
        self.max_batch = max_batch
        self.min_size, self.max_size = self.info.input_size

    def __call__(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        out: list[dict[str, np.ndarray]] = []
        for i in range(0, len(images), self.max_batch):
            out += self._forward(images[i:i + self.max_batch])
        return out

    def _forward(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        batch, sizes = normalise([fit(im, self.min_size, self.max_size, self.device) for im in images])
        with torch.inference_mode(), autocast(self.device):
            logits = head_logits(self.model, batch)
        with torch.inference_mode():
            classes, scores = classes_and_scores(logits)
        dtype = np.uint8 if logits.shape[1] <= 256 else np.int16
        classes, scores = classes.cpu().numpy().astype(dtype), scores.cpu().numpy().astype(np.float16)
        cells = [on_grid(size, tuple(batch.shape[-2:]), tuple(logits.shape[-2:])) for size in sizes]
        return [{"classes": classes[i, :gh, :gw], "scores": scores[i, :gh, :gw]}
                for i, (gh, gw) in enumerate(cells)]


def resize_nearest(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """A label map resampled to height x width by nearest pixel centres."""
    h, w = grid.shape[:2]
    if (h, w) == (height, width):
        return grid
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return grid[rows[:, None], cols[None, :]]


# ---- metrics the field reports ----------------------------------------------------


def confusion(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """int64[C, C] counts of (gt class, predicted class) over pixels whose gt is scored
    (gt < num_classes; IGNORE and other out-of-range values are left out)."""
    gt, pred = np.asarray(gt).reshape(-1).astype(np.int64), np.asarray(pred).reshape(-1).astype(np.int64)
    if gt.shape != pred.shape:
        raise ValueError(f"gt has {gt.size} pixels, prediction {pred.size}")
    keep = (gt >= 0) & (gt < num_classes)
    pred = np.clip(pred[keep], 0, num_classes - 1)
    return np.bincount(gt[keep] * num_classes + pred, minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def segmentation_metrics(conf: np.ndarray, labels: Sequence[str] | None = None) -> dict:
    """Pixel accuracy, mean IoU (over classes present in the gt or the predictions),
    frequency-weighted IoU, and per-class IoU, from a confusion matrix (rows = gt)."""
    conf = np.asarray(conf, dtype=np.float64)
    total = conf.sum()
    if total == 0:
        raise LakelensError("no scored pixel: the ground truth covers none of the predictions")
    tp = np.diag(conf)
    gt_px, pred_px = conf.sum(axis=1), conf.sum(axis=0)
    union = gt_px + pred_px - tp
    present = union > 0
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=present)
    freq = gt_px / total
    names = list(labels) if labels is not None else [str(i) for i in range(len(tp))]
    return {"pixel_accuracy": float(tp.sum() / total),
            "mean_iou": float(iou[present].mean()),
            "fw_iou": float((freq[present] * iou[present]).sum()),
            "per_class_iou": {names[i]: float(iou[i]) for i in np.flatnonzero(present)}}


def evaluate_model(model: nn.Module, items: Sequence[tuple[np.ndarray, np.ndarray]],
                   num_classes: int, *, min_size: int, max_size: int,
                   device: torch.device | str = "cpu") -> np.ndarray:
    """The confusion matrix of `model` over (image uint8[h, w, 3], gt class map [h, w])
    pairs, each image resized and its prediction mapped back as annotate does."""
    device = torch.device(device)
    conf = np.zeros((num_classes, num_classes), np.int64)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for image, gt in items:
            batch, (size,) = normalise([fit(image, min_size, max_size, device)])
            with autocast(device):
                logits = head_logits(model, batch)
            gh, gw = on_grid(size, tuple(batch.shape[-2:]), tuple(logits.shape[-2:]))
            # as annotate stores it: argmax on the head's grid, nearest to the image's size
            pred = resize_nearest(logits[0, :, :gh, :gw].argmax(dim=0).cpu().numpy(), *gt.shape)
            conf += confusion(gt, pred, num_classes)
    model.train(was_training)
    return conf
