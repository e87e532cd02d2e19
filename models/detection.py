"""torchvision detector builders: R-CNNs for detection (Faster), segmentation (Mask) and
pose (Keypoint), and the single-stage detectors the field names beside them (SSD,
SSDlite, RetinaNet, FCOS), all with the same outputs.

Besides torchvision's published architectures there are three ``*_tiny`` ones: the same
R-CNN heads on a small four-stage CNN, for CPU smoke runs, tests and quick training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torchvision.models import detection as tvd
from torchvision.models._api import WeightsEnum
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOSClassificationHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetClassificationHead
from torchvision.models.detection.ssd import SSDClassificationHead
from torchvision.models.detection.ssdlite import SSDLiteClassificationHead
from torchvision.ops import MultiScaleRoIAlign

from models import weights as W
from models.errors import LakelensError
from models.info import ModelInfo

logger = logging.getLogger(__name__)

COCO_LABELS: tuple[str, ...] = tuple(tvd.FasterRCNN_ResNet50_FPN_V2_Weights.DEFAULT.meta["categories"])
COCO_KEYPOINTS: tuple[str, ...] = tuple(
    tvd.KeypointRCNN_ResNet50_FPN_Weights.DEFAULT.meta["keypoint_names"]
)
PERSON_LABELS: tuple[str, ...] = ("__background__", "person")
TINY_CHANNELS = 128
TINY_BOX_DIM = 256
TINY_HEAD = (64, 64)  # mask/keypoint head convs: with 4 x 128 they cost 4x the rest on CPU


def _tiny_backbone() -> nn.Module:
    """Four stride-2 conv stages (output stride 16, 128 channels), GroupNorm throughout."""
    layers: list[nn.Module] = []
    channels = [3, 32, 64, 96, TINY_CHANNELS]
    for cin, cout in zip(channels[:-1], channels[1:], strict=True):
        layers += [
            nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
            nn.GroupNorm(8, cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.GroupNorm(8, cout),
            nn.ReLU(inplace=True),
        ]
    body = nn.Sequential(*layers)
    body.out_channels = channels[-1]
    return body


def _tiny_kwargs(kwargs: dict, num_classes: int) -> dict:
    """Small anchors on one stride-16 map, a 256-wide box head, few sampled RoIs."""
    defaults = {
        "rpn_anchor_generator": AnchorGenerator(((16, 32, 64, 128, 256),), ((0.5, 1.0, 2.0),)),
        "box_roi_pool": MultiScaleRoIAlign(["0"], 7, 2),
        "box_head": TwoMLPHead(TINY_CHANNELS * 7 * 7, TINY_BOX_DIM),
        "box_predictor": FastRCNNPredictor(TINY_BOX_DIM, num_classes),
        "rpn_pre_nms_top_n_test": 300,
        "rpn_post_nms_top_n_test": 100,
        "box_batch_size_per_image": 64,
    }
    return {**defaults, **kwargs}


def fasterrcnn_tiny(*, num_classes: int = 91, **kwargs) -> tvd.FasterRCNN:
    return tvd.FasterRCNN(_tiny_backbone(), num_classes=None, **_tiny_kwargs(kwargs, num_classes))


def maskrcnn_tiny(*, num_classes: int = 91, **kwargs) -> tvd.MaskRCNN:
    kwargs.setdefault("mask_roi_pool", MultiScaleRoIAlign(["0"], 14, 2))
    kwargs.setdefault("mask_head", MaskRCNNHeads(TINY_CHANNELS, TINY_HEAD, 1))
    kwargs.setdefault("mask_predictor", MaskRCNNPredictor(TINY_HEAD[-1], TINY_HEAD[-1], num_classes))
    return tvd.MaskRCNN(_tiny_backbone(), num_classes=None, **_tiny_kwargs(kwargs, num_classes))


def keypointrcnn_tiny(*, num_classes: int = 2, num_keypoints: int = 17, **kwargs) -> tvd.KeypointRCNN:
    kwargs.setdefault("keypoint_roi_pool", MultiScaleRoIAlign(["0"], 14, 2))
    kwargs.setdefault("keypoint_head", KeypointRCNNHeads(TINY_CHANNELS, TINY_HEAD))
    kwargs.setdefault("keypoint_predictor", KeypointRCNNPredictor(TINY_HEAD[-1], num_keypoints))
    return tvd.KeypointRCNN(_tiny_backbone(), num_classes=None, num_keypoints=None,
                            **_tiny_kwargs(kwargs, num_classes))


@dataclass(frozen=True)
class ArchSpec:
    task: str
    builder: Callable[..., nn.Module]
    published: WeightsEnum | None  # torchvision's published weights, None for tiny archs
    min_size: int  # shorter side the model sees by default
    max_size: int
    kind: str = "rcnn"  # rcnn, retinanet, fcos, ssd (fixed square input), ssdlite


# Where a single-stage checkpoint's class count shows when it names no labels: the
# classifier's first conv and how many anchors share its output channels.
CLASS_LOGITS = {"retinanet": ("head.classification_head.cls_logits.weight", 9),
                "fcos": ("head.classification_head.cls_logits.weight", 1),
                "ssd": ("head.classification_head.module_list.0.weight", 4),
                "ssdlite": ("head.classification_head.module_list.0.1.weight", 6)}


DETECTION_ARCHS: dict[str, ArchSpec] = {
    "fasterrcnn_resnet50_fpn_v2": ArchSpec(
        "detect", tvd.fasterrcnn_resnet50_fpn_v2,
        tvd.FasterRCNN_ResNet50_FPN_V2_Weights.DEFAULT, 800, 1333),
    "fasterrcnn_resnet50_fpn": ArchSpec(
        "detect", tvd.fasterrcnn_resnet50_fpn, tvd.FasterRCNN_ResNet50_FPN_Weights.DEFAULT,
        800, 1333),
    "fasterrcnn_mobilenet_v3_large_fpn": ArchSpec(
        "detect", tvd.fasterrcnn_mobilenet_v3_large_fpn,
        tvd.FasterRCNN_MobileNet_V3_Large_FPN_Weights.DEFAULT, 800, 1333),
    "fasterrcnn_mobilenet_v3_large_320_fpn": ArchSpec(
        "detect", tvd.fasterrcnn_mobilenet_v3_large_320_fpn,
        tvd.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.DEFAULT, 320, 640),
    "fasterrcnn_tiny": ArchSpec("detect", fasterrcnn_tiny, None, 256, 512),
    "retinanet_resnet50_fpn_v2": ArchSpec(
        "detect", tvd.retinanet_resnet50_fpn_v2, tvd.RetinaNet_ResNet50_FPN_V2_Weights.DEFAULT,
        800, 1333, kind="retinanet"),
    "fcos_resnet50_fpn": ArchSpec(
        "detect", tvd.fcos_resnet50_fpn, tvd.FCOS_ResNet50_FPN_Weights.DEFAULT, 800, 1333,
        kind="fcos"),
    "ssd300_vgg16": ArchSpec(
        "detect", tvd.ssd300_vgg16, tvd.SSD300_VGG16_Weights.DEFAULT, 300, 300, kind="ssd"),
    "ssdlite320_mobilenet_v3_large": ArchSpec(
        "detect", tvd.ssdlite320_mobilenet_v3_large,
        tvd.SSDLite320_MobileNet_V3_Large_Weights.DEFAULT, 320, 320, kind="ssdlite"),
    "maskrcnn_resnet50_fpn_v2": ArchSpec(
        "segment", tvd.maskrcnn_resnet50_fpn_v2, tvd.MaskRCNN_ResNet50_FPN_V2_Weights.DEFAULT,
        800, 1333),
    "maskrcnn_resnet50_fpn": ArchSpec(
        "segment", tvd.maskrcnn_resnet50_fpn, tvd.MaskRCNN_ResNet50_FPN_Weights.DEFAULT,
        800, 1333),
    "maskrcnn_tiny": ArchSpec("segment", maskrcnn_tiny, None, 256, 512),
    "keypointrcnn_resnet50_fpn": ArchSpec(
        "pose", tvd.keypointrcnn_resnet50_fpn, tvd.KeypointRCNN_ResNet50_FPN_Weights.DEFAULT,
        800, 1333),
    "keypointrcnn_tiny": ArchSpec("pose", keypointrcnn_tiny, None, 256, 512),
}


def input_sizes(arch: str, image_size: int | None) -> tuple[int, int]:
    """(min_size, max_size) the model resizes to: its own, or `image_size` with the
    arch's long-side ratio kept."""
    spec = DETECTION_ARCHS[arch]
    if image_size is None or spec.kind in ("ssd", "ssdlite"):  # SSDs see a fixed square
        return spec.min_size, spec.max_size
    return image_size, round(image_size * spec.max_size / spec.min_size)


def _head_sizes(task: str, state_dict: dict[str, torch.Tensor], meta: dict,
                kind: str = "rcnn") -> tuple[int, int]:
    """(num_classes, num_keypoints) from checkpoint metadata, else from tensor shapes."""
    labels = meta.get("labels")
    if labels:
        num_classes = len(labels)
    elif kind in CLASS_LOGITS:
        key, anchors = CLASS_LOGITS[kind]
        num_classes = int(state_dict[key].shape[0]) // anchors
    else:
        num_classes = int(state_dict["roi_heads.box_predictor.cls_score.weight"].shape[0])
    num_keypoints = 0
    if task == "pose":
        names = meta.get("keypoint_names")
        num_keypoints = len(names) if names else int(
            state_dict["roi_heads.keypoint_predictor.kps_score_lowres.weight"].shape[1])
    return num_classes, num_keypoints


def build_detector(
    arch: str,
    *,
    weights: str,
    image_size: int | None = None,
    score_threshold: float = 0.05,
    num_classes: int | None = None,
    num_keypoints: int | None = None,
) -> tuple[nn.Module, ModelInfo]:
    """Build a torchvision R-CNN in eval mode.

    weights: a spec (``default``, ``random`` or a checkpoint path, see models.weights).
    num_classes / num_keypoints: head sizes for ``random`` (e.g. training on a dataset);
    checkpoints carry their own, ``default`` uses COCO's.
    The model takes float images in [0, 1], CHW, any size; its outputs are in the pixels
    of the image it was given: boxes float[N, 4] xyxy, labels int64[N], scores float[N],
    masks float[N, 1, H, W] probabilities, keypoints float[N, K, 3] (x, y, v).
    """
    for task in ("detect", "segment", "pose"):
        if arch in DETECTION_ARCHS and DETECTION_ARCHS[arch].task == task:
            break
    else:
        raise LakelensError(
            f"unknown detector arch {arch!r}; choose from {', '.join(sorted(DETECTION_ARCHS))}")
    spec = DETECTION_ARCHS[arch]
    ckpt = W.read_for(weights, task=task, arch=arch) if W.is_path_spec(weights) else None
    if image_size is None and ckpt is not None:
        image_size = ckpt.meta.get("image_size")  # the size it was trained at
    min_size, max_size = input_sizes(arch, image_size)
    kwargs = _size_kwargs(spec, min_size, max_size, score_threshold)
    default_labels = PERSON_LABELS if task == "pose" else COCO_LABELS
    keypoint_names: tuple[str, ...] = COCO_KEYPOINTS if task == "pose" else ()

    if weights == W.DEFAULT:
        if spec.published is None:
            raise LakelensError(
                f"arch {arch!r} has no published weights; use --weights random or a checkpoint")
        model = spec.builder(weights=spec.published, progress=False, **kwargs)
        labels = tuple(spec.published.meta["categories"])
        weights_id = f"default:{type(spec.published).__name__}.{spec.published.name}"
    elif weights == W.RANDOM:
        n_cls = num_classes or len(default_labels)
        if task == "pose":
            n_kp = num_keypoints or len(COCO_KEYPOINTS)
            kwargs["num_keypoints"] = n_kp
            if n_kp != len(COCO_KEYPOINTS):
                keypoint_names = tuple(f"kp{i}" for i in range(n_kp))
        labels = _labels(n_cls, default_labels)
        with W.seeded():
            model = _build_untrained(spec, n_cls, kwargs)
        weights_id = f"random:seed{W.RANDOM_SEED}"
    else:
        assert ckpt is not None
        try:
            n_cls, n_kp = _head_sizes(task, ckpt.state_dict, ckpt.meta, spec.kind)
        except KeyError as e:
            raise LakelensError(
                f"checkpoint {weights!r} does not fit arch {arch!r}: it has no {e.args[0]}") from e
        if task == "pose":
            kwargs["num_keypoints"] = n_kp
            keypoint_names = tuple(ckpt.meta.get("keypoint_names") or
                                   (COCO_KEYPOINTS if n_kp == 17 else
                                    [f"kp{i}" for i in range(n_kp)]))
        labels = tuple(ckpt.meta.get("labels") or _labels(n_cls, default_labels))
        model = _build_untrained(spec, n_cls, kwargs)
        W.load_into(model, ckpt, spec=weights, arch=arch)
        weights_id = ckpt.weights_id
    model.eval()
    info = ModelInfo(task=task, arch=arch, weights=weights, weights_id=weights_id,
                     labels=labels, keypoint_names=keypoint_names, input_size=(min_size, max_size))
    return model, info


def _size_kwargs(spec: ArchSpec, min_size: int, max_size: int, score_threshold: float) -> dict:
    """The builder's input-size and score-threshold arguments: R-CNNs name the threshold
    box_score_thresh, single-stage detectors score_thresh; SSDs resize to a fixed square."""
    if spec.kind == "rcnn":
        return {"min_size": min_size, "max_size": max_size, "box_score_thresh": score_threshold}
    if spec.kind in ("ssd", "ssdlite"):
        return {"score_thresh": score_threshold}
    return {"min_size": min_size, "max_size": max_size, "score_thresh": score_threshold}


def _labels(num_classes: int, default: tuple[str, ...]) -> tuple[str, ...]:
    if num_classes == len(default):
        return default
    return ("__background__",) + tuple(f"class_{i}" for i in range(1, num_classes))


def _build_untrained(spec: ArchSpec, num_classes: int, kwargs: dict) -> nn.Module:
    if spec.published is None:
        return spec.builder(num_classes=num_classes, **kwargs)
    return spec.builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)


def build_for_training(arch: str, *, init: str, num_classes: int, num_keypoints: int = 0,
                       image_size: int | None = None, seed: int = 0) -> tuple[nn.Module, ModelInfo]:
    """A detector to fine-tune or train, in train mode: `init` weights (default, random or
    a checkpoint) with the box/mask/keypoint heads resized to `num_classes` (background
    included) and `num_keypoints`. New heads are seeded."""
    if init == W.RANDOM:
        model, info = build_detector(arch, weights=init, image_size=image_size,
                                     num_classes=num_classes, num_keypoints=num_keypoints or None)
    else:
        model, info = build_detector(arch, weights=init, image_size=image_size)
        with W.seeded(seed):
            resize_heads(model, num_classes, num_keypoints)
    model.train()
    return model, info


def resize_heads(model: nn.Module, num_classes: int, num_keypoints: int = 0) -> None:
    """Replace the class-specific predictors whose sizes differ (the rest is kept)."""
    if not hasattr(model, "roi_heads"):
        _resize_single_stage(model, num_classes)
        return
    heads = model.roi_heads
    box = heads.box_predictor
    if box.cls_score.out_features != num_classes:
        heads.box_predictor = FastRCNNPredictor(box.cls_score.in_features, num_classes)
    if heads.has_mask() and heads.mask_predictor.mask_fcn_logits.out_channels != num_classes:
        conv = heads.mask_predictor.conv5_mask
        heads.mask_predictor = MaskRCNNPredictor(conv.in_channels, conv.out_channels, num_classes)
    if heads.has_keypoint():
        kps = heads.keypoint_predictor.kps_score_lowres
        if kps.out_channels != num_keypoints:
            heads.keypoint_predictor = KeypointRCNNPredictor(kps.in_channels, num_keypoints)


def _resize_single_stage(model: nn.Module, num_classes: int) -> None:
    """A new classification head for RetinaNet, FCOS, SSD or SSDlite when the class count
    differs; the box regression head and the backbone are kept."""
    head = model.head.classification_head
    if isinstance(head, RetinaNetClassificationHead | FCOSClassificationHead):
        if head.num_classes == num_classes:
            return
        in_channels = head.cls_logits.in_channels
        norm = partial(nn.GroupNorm, 32) if any(isinstance(m, nn.GroupNorm)
                                                for m in head.conv.modules()) else None
        if isinstance(head, FCOSClassificationHead):
            new = FCOSClassificationHead(in_channels, head.num_anchors, num_classes, norm_layer=norm)
        else:
            new = RetinaNetClassificationHead(in_channels, head.num_anchors, num_classes, norm_layer=norm)
    else:  # SSD / SSDlite: one conv per feature map, anchors x classes channels each
        if head.num_columns == num_classes:
            return
        convs = [m if isinstance(m, nn.Conv2d) else m[-1] for m in head.module_list]
        anchors = [c.out_channels // head.num_columns for c in convs]
        if isinstance(head.module_list[0], nn.Conv2d):
            new = SSDClassificationHead([c.in_channels for c in convs], anchors, num_classes)
        else:
            firsts = [m[0][0] for m in head.module_list]  # the depthwise conv of each map
            new = SSDLiteClassificationHead([c.in_channels for c in firsts], anchors, num_classes,
                                            partial(nn.BatchNorm2d, eps=0.001, momentum=0.03))
    model.head.classification_head = new
