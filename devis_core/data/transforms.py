"""Image-level transforms of the COCO stages: DETR's multi-scale training recipe and the test resize.

A sample is ``(image, target)``: a PIL RGB image (kept as PIL through the geometric steps so that the
resize is PIL's bilinear, as in the official pipeline, spec §13.16) and a dict holding ``boxes`` as a
``tv_tensors.BoundingBoxes`` (xyxy pixels), ``masks`` as a ``tv_tensors.Mask`` (N, H, W) uint8 and
per-instance ``labels`` / ``area`` / ``iscrowd``. torchvision.transforms.v2 moves image, boxes and masks
together; :class:`ToModelInputs` ends every pipeline with the model's conventions (normalised image,
boxes normalised cx, cy, w, h, bool masks, ``size``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..box_ops import box_xyxy_to_cxcywh

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_SCALES = tuple(range(480, 801, 32))       # 480, 512, ..., 800
TRAIN_MAX_SIZE = 1333
CROP_PRE_RESIZES = (400, 500, 600)
CROP_SIZE_RANGE = (384, 600)
# Fields indexed by instance: they follow the boxes when instances are dropped.
INSTANCE_FIELDS = ("boxes", "masks", "labels", "area", "iscrowd")


def detr_resize_size(image_hw: tuple[int, int], size: int, max_size: float | None = None) -> tuple[int, int]:
    """Output (h, w) of DETR's ``get_size_with_aspect_ratio``: short side ``size`` unless the long side
    would exceed ``max_size`` (then short side round(max_size·short/long)); long side truncated.

    image_hw: (h, w) of the input. Returns (new_h, new_w).
    """
    h, w = image_hw
    if max_size is not None:
        short, long = float(min(h, w)), float(max(h, w))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def image_hw(image) -> tuple[int, int]:
    """(h, w) of a PIL image or a (C, H, W) tensor."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


def _geometric(fn, image, target: dict, *args):
    """Apply one v2 functional op to the image and to the target's boxes and masks together."""
    target = dict(target)
    for key in ("boxes", "masks"):
        if key in target:
            target[key] = fn(target[key], *args)
    return fn(image, *args), target


def _select_instances(target: dict, keep: Tensor) -> dict:
    target = dict(target)
    for key in INSTANCE_FIELDS:
        if key in target:
            value = target[key]
            selected = value.as_subclass(Tensor)[keep]
            # indexing unwraps tv_tensors; re-wrap so later transforms still see boxes / masks
            target[key] = tv_tensors.wrap(selected, like=value) if isinstance(value, tv_tensors.TVTensor) else selected
    return target


class RandomShortSideResize:
    """Resize so the short side is one of ``sizes`` (drawn uniformly), long side ≤ ``max_size``."""

    def __init__(self, sizes: Sequence[int], max_size: float | None = None):
        if not sizes:
            raise ValueError("RandomShortSideResize: sizes is empty")
        self.sizes = tuple(int(s) for s in sizes)
        self.max_size = max_size

    def __call__(self, image, target: dict):
        size = self.sizes[int(torch.randint(len(self.sizes), ()))]
        new_hw = detr_resize_size(image_hw(image), size, self.max_size)
        return _geometric(F.resize, image, target, list(new_hw))


class RandomSizeCrop:
    """Crop a random region of width in [min_size, min(W, max_size)] and height in
    [min_size, min(H, max_size)] (a side shorter than ``min_size`` is kept whole); boxes are clipped
    and instances left empty by the crop (no mask pixel, or a zero-area box without masks) dropped."""

    def __init__(self, min_size: int, max_size: int):
        if min_size > max_size:
            raise ValueError(f"RandomSizeCrop: min_size {min_size} > max_size {max_size}")
        self.min_size, self.max_size = int(min_size), int(max_size)

    def _draw(self, length: int) -> int:
        hi = min(length, self.max_size)
        lo = min(self.min_size, hi)
        return int(torch.randint(lo, hi + 1, ()))

    def __call__(self, image, target: dict):
        h, w = image_hw(image)
        ch, cw = self._draw(h), self._draw(w)
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        image, target = _geometric(F.crop, image, target, top, left, ch, cw)
        if "boxes" in target:
            target["boxes"] = F.clamp_bounding_boxes(target["boxes"])
            if "masks" in target:
                keep = target["masks"].as_subclass(Tensor).flatten(1).bool().any(1)
            else:
                b = target["boxes"].as_subclass(Tensor)
                keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            target = _select_instances(target, keep)
        return image, target


class ToModelInputs:
    """PIL image -> normalised float (3, H, W); boxes -> (N, 4) normalised cx, cy, w, h float32;
    masks -> (N, H, W) bool; adds ``size`` = (H, W) after the transforms."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image, target: dict):
        img = F.to_dtype(F.to_image(image), torch.float32, scale=True)
        img = F.normalize(img, self.mean, self.std)
        h, w = image_hw(img)
        target = dict(target)
        if "boxes" in target:
            boxes = target["boxes"].as_subclass(Tensor).to(torch.float32)
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            target["boxes"] = box_xyxy_to_cxcywh(boxes) / scale
        if "masks" in target:
            target["masks"] = target["masks"].as_subclass(Tensor).bool()
        target["size"] = torch.tensor([h, w], dtype=torch.int64)
        return img, target


def make_train_transforms(scale_factor: float = 1.0) -> v2.Compose:
    """DETR's COCO training recipe, every size × ``scale_factor`` (INPUT.SCALE_FACTOR_TRAIN): flip p=0.5;
    then with p=0.5 either a multi-scale resize (short side 480..800 step 32, long ≤ 1333) or
    resize to 400/500/600 + random crop in [384, 600] + the same multi-scale resize."""
    scales, pre, crop, max_size = TRAIN_SCALES, CROP_PRE_RESIZES, CROP_SIZE_RANGE, float(TRAIN_MAX_SIZE)
    if scale_factor != 1.0:
        # int() truncation as in the official make_coco_train_transforms
        scales = [int(scale_factor * s) for s in scales]
        pre = [int(scale_factor * s) for s in pre]
        crop = [int(scale_factor * s) for s in crop]
        max_size = scale_factor * TRAIN_MAX_SIZE
    return v2.Compose([
        v2.RandomHorizontalFlip(0.5),
        v2.RandomChoice([
            RandomShortSideResize(scales, max_size),
            v2.Compose([RandomShortSideResize(pre), RandomSizeCrop(*crop), RandomShortSideResize(scales, max_size)]),
        ]),
        ToModelInputs(),
    ])


def make_val_transforms(min_size: int = 800, max_size: float = 1333) -> v2.Compose:
    """Test-time resize: short side ``min_size`` (INPUT.MIN_SIZE_TEST), long ≤ ``max_size``
    (INPUT.MAX_SIZE_TEST), then normalisation."""
    return v2.Compose([RandomShortSideResize([min_size], max_size), ToModelInputs()])


def build_transforms(cfg, is_train: bool) -> v2.Compose:
    """The COCO transforms the config asks for (INPUT.SCALE_FACTOR_TRAIN / MIN_SIZE_TEST / MAX_SIZE_TEST)."""
    if is_train:
        return make_train_transforms(cfg.INPUT.SCALE_FACTOR_TRAIN)
    return make_val_transforms(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)


def wrap_target(target: dict, image_hw_: tuple[int, int]) -> dict:
    """Turn plain tensors into tv_tensors so the v2 transforms move them with the image.

    target: boxes (N, 4) xyxy pixels, optional masks (N, H, W). Returns a copy with
    ``BoundingBoxes`` and ``Mask`` (uint8, since resize cannot interpolate bool).
    """
    target = dict(target)
    target["boxes"] = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=image_hw_)
    if "masks" in target:
        target["masks"] = tv_tensors.Mask(target["masks"].to(torch.uint8))
    return target
