"""Clip-level training transforms of DeVIS (spec §6.2): geometry drawn once per clip, colour per frame.

A clip is ``(frames, target)``: ``frames`` a ``tv_tensors.Video`` (T, 3, H, W) uint8 RGB and ``target`` a
dict, instance-major (entry n·T + t), holding ``boxes`` as ``tv_tensors.BoundingBoxes`` (N·T, 4) xyxy
pixels, ``masks`` as ``tv_tensors.Mask`` (N·T, H, W) uint8, ``valid`` (N·T,) bool and ``labels`` (N,)
0-based. Every geometric step is one torchvision.transforms.v2 call on the whole clip, so flip, sizes and
crop are shared by all frames by construction. :class:`ToClipTargets` ends the pipeline with what the
clip matcher and criterion read (see its docstring).

Colour order: the official training read frames with ``cv2.imread`` and never converted them, so the
network saw BGR tensors normalised with the RGB ImageNet statistics (spec §6.2, §12.6), while inference
and the COCO stages are RGB. We train in RGB; ``bgr=True`` reproduces the official inputs.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..box_ops import box_xyxy_to_cxcywh
from .transforms import IMAGENET_MEAN, IMAGENET_STD, RandomShortSideResize, image_hw

__all__ = ["ClipRandomSizeCrop", "ClipPhotometricDistort", "ToClipTargets", "make_train_clip_transforms",
           "fill_invalid_boxes", "masks_to_boxes_xyxy", "rgb_to_hsv", "hsv_to_rgb", "cast_uint8_wrapping",
           "MIN_MASK_PIXELS", "FILLER_SIZE", "VIS_TRAIN_SCALES", "VIS_TRAIN_MAX_SIZE"]

VIS_TRAIN_SCALES = (288, 320, 352, 392, 416, 448, 480, 512)
VIS_TRAIN_MAX_SIZE = 768
VIS_CROP_PRE_RESIZES = (400, 500, 600)
VIS_CROP_SIZE_RANGE = (384, 600)
# Non-multi-scale (VisTR-style) recipe of the ablations 0-2.
FIXED_TRAIN_SCALES = tuple(range(480, 769, 32))
FIXED_TRAIN_MAX_SIZE = 800
FIXED_OUT_SIZE, FIXED_OUT_MAX_SIZE = 300, 540
# A frame whose augmented mask has this many pixels or fewer counts as absent (official post-processing).
MIN_MASK_PIXELS = 2
# Width and height of the box given to absent frames; the ε-GIoU of box_ops tolerates it.
FILLER_SIZE = 1e-6
_PERMUTATIONS = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


class ClipRandomSizeCrop:
    """Crop all frames of a clip to one random region of height in [min_size, min(H, max_size)] and width
    in [min_size, min(W, max_size)] (uniform integers, offset uniform); boxes are clipped to the crop.

    As in the official ``VISRandomCrop`` the crop is skipped when H or W is below ``min_size``. Unlike it,
    the offset never exceeds H − h (the official inclusive ``randint`` could lose one row, spec §12.7).
    Instances are never dropped here: :class:`ToClipTargets` decides validity per frame afterwards.
    """

    def __init__(self, min_size: int, max_size: int):
        if min_size > max_size:
            raise ValueError(f"ClipRandomSizeCrop: min_size {min_size} > max_size {max_size}")
        self.min_size, self.max_size = int(min_size), int(max_size)

    def __call__(self, frames, target: dict):
        h, w = image_hw(frames)
        if h < self.min_size or w < self.min_size:
            return frames, target
        ch = int(torch.randint(self.min_size, min(h, self.max_size) + 1, ()))
        cw = int(torch.randint(self.min_size, min(w, self.max_size) + 1, ()))
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        target = dict(target)
        for key in ("boxes", "masks"):
            if key in target:
                target[key] = F.crop(target[key], top, left, ch, cw)
        if "boxes" in target:
            target["boxes"] = F.clamp_bounding_boxes(target["boxes"])
        return F.crop(frames, top, left, ch, cw), target


def rgb_to_hsv(rgb: Tensor) -> Tensor:
    """OpenCV's float RGB -> HSV, valid for values outside [0, 255] too.

    rgb: (..., 3, H, W) float. Returns (..., 3, H, W): hue in degrees [0, 360), saturation
    (max − min) / max (0 where max = 0), value = max.
    """
    r, g, b = rgb.unbind(-3)
    v, _ = rgb.max(-3)
    mn, _ = rgb.min(-3)
    delta = v - mn
    safe_delta = torch.where(delta == 0, torch.ones_like(delta), delta)
    s = torch.where(v == 0, torch.zeros_like(v), delta / torch.where(v == 0, torch.ones_like(v), v))
    # OpenCV picks the first channel equal to the maximum in the order R, G, B.
    h = torch.where(v == r, 60 * (g - b) / safe_delta,
                    torch.where(v == g, 120 + 60 * (b - r) / safe_delta, 240 + 60 * (r - g) / safe_delta))
    h = torch.where(delta == 0, torch.zeros_like(h), h)
    h = torch.where(h < 0, h + 360, h)
    return torch.stack([h, s, v], dim=-3)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """OpenCV's float HSV -> RGB (hue in degrees, taken modulo 360; saturation may exceed 1).

    hsv: (..., 3, H, W) float. Returns (..., 3, H, W) float RGB.
    """
    h, s, v = hsv.unbind(-3)
    h6 = torch.remainder(h / 60.0, 6.0)
    sector = h6.floor().clamp(max=5)
    f = h6 - sector
    p = v * (1 - s)
    q = v * (1 - s * f)
    t = v * (1 - s * (1 - f))
    # (R, G, B) per sector 0..5.
    table = torch.stack([torch.stack([v, t, p], -3), torch.stack([q, v, p], -3), torch.stack([p, v, t], -3),
                         torch.stack([p, q, v], -3), torch.stack([t, p, v], -3), torch.stack([v, p, q], -3)])
    idx = sector.long().unsqueeze(-3).unsqueeze(0).expand((1,) + table.shape[1:])
    return table.gather(0, idx).squeeze(0)


def cast_uint8_wrapping(x: Tensor) -> Tensor:
    """Float -> uint8 as NumPy's ``astype('uint8')`` does on x86: truncate toward zero, wrap modulo 256.

    x: any shape, float. Returns the same shape, uint8 (e.g. 260.7 -> 4, -3.5 -> 253).
    """
    return torch.trunc(x).to(torch.int32).bitwise_and(255).to(torch.uint8)


def _coin(t: int, p: float = 0.5) -> Tensor:
    return torch.rand(t) < p


class ClipPhotometricDistort:
    """The official ``VISPhotometricDistort``, drawn independently for every frame, vectorised over T.

    Per frame: with p=0.5 branch A [contrast α∈U(0.5, 1.3), saturation ×U(0.7, 1.3), hue +U(−8, 8)°] else
    branch B [saturation, hue, contrast α∈U(0.5, 1.5)], each op applied with p=0.5; then with p=0.5 the
    lighting noise, which itself (p=0.5) permutes the channels by one of the 6 permutations (identity
    included). Brightness stays disabled as in the official recipe.

    Contrast scales all channels by one positive factor, which scales V and leaves H and S unchanged, so it
    commutes with the HSV steps: the two branches differ only in the range of α and are computed as one.
    ``wrap_overflow=True`` casts back to uint8 as NumPy's ``astype`` did (truncate, wrap modulo 256; spec
    §12.7); False clamps to [0, 255] instead.
    """

    def __init__(self, wrap_overflow: bool = True):
        self.wrap_overflow = bool(wrap_overflow)

    def __call__(self, frames, target: dict):
        """frames: (T, 3, H, W) uint8 RGB (a Video). Returns frames of the same type, shape and dtype."""
        t = int(frames.shape[0])
        x = frames.as_subclass(Tensor).to(torch.float32)
        branch_a = _coin(t)
        alpha_hi = torch.where(branch_a, torch.tensor(1.3), torch.tensor(1.5))
        alpha = 0.5 + torch.rand(t) * (alpha_hi - 0.5)
        alpha = torch.where(_coin(t), alpha, torch.ones(t))
        sat = torch.where(_coin(t), 0.7 + 0.6 * torch.rand(t), torch.ones(t))
        hue = torch.where(_coin(t), -8.0 + 16.0 * torch.rand(t), torch.zeros(t))
        x = x * alpha.view(t, 1, 1, 1)
        hsv = rgb_to_hsv(x)
        h = hsv[:, 0] + hue.view(t, 1, 1)
        # the official hue wrap: one step of ±360
        h = torch.where(h > 360, h - 360, torch.where(h < 0, h + 360, h))
        x = hsv_to_rgb(torch.stack([h, hsv[:, 1] * sat.view(t, 1, 1), hsv[:, 2]], dim=1))
        perm = torch.randint(len(_PERMUTATIONS), (t,))
        permute = _coin(t) & _coin(t)
        order = torch.where(permute.view(t, 1), _PERMUTATIONS[perm], _PERMUTATIONS[0])
        x = x.gather(1, order.view(t, 3, 1, 1).expand_as(x))
        out = cast_uint8_wrapping(x) if self.wrap_overflow else x.round().clamp(0, 255).to(torch.uint8)
        return tv_tensors.wrap(out, like=frames) if isinstance(frames, tv_tensors.TVTensor) else out, target


def masks_to_boxes_xyxy(masks: Tensor) -> Tensor:
    """Boxes of masks as ``torchvision.ops.masks_to_boxes`` gives them (x1, y1 = last pixel indices).

    masks: (M, H, W) bool. Returns (M, 4) float x0, y0, x1, y1 in pixels, so w = x1 − x0 is one pixel
    less than the mask's extent (kept for parity with the official CREATE_BBX_FROM_MASK); zeros for
    empty masks.
    """
    m, h, w = masks.shape
    cols, rows = masks.any(1), masks.any(2)
    xs = torch.arange(w, dtype=torch.float32)
    ys = torch.arange(h, dtype=torch.float32)
    big = float(max(h, w))
    x0 = torch.where(cols, xs, big).amin(1) if w else torch.zeros(m)
    x1 = torch.where(cols, xs, -1.0).amax(1) if w else torch.zeros(m)
    y0 = torch.where(rows, ys, big).amin(1) if h else torch.zeros(m)
    y1 = torch.where(rows, ys, -1.0).amax(1) if h else torch.zeros(m)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    return torch.where(cols.any(1, keepdim=True), boxes, torch.zeros_like(boxes))


def fill_invalid_boxes(boxes: Tensor, valid: Tensor) -> Tensor:
    """Give every absent frame the centre of the nearest present frame of its instance and w = h = 1e-6.

    boxes: (N, T, 4) normalised cx, cy, w, h; valid: (N, T) bool, every row with at least one True.
    Returns (N, T, 4); ties between an earlier and a later present frame go to the earlier one.
    """
    n, t = valid.shape
    if n == 0:
        return boxes.clone()
    pos = torch.arange(t)
    dist = (pos.view(t, 1) - pos.view(1, t)).abs().float()                      # (t_query, t_source)
    dist = torch.where(valid.view(n, 1, t), dist.view(1, t, t), torch.tensor(float("inf")))
    # argmin returns the first minimum, i.e. the earlier frame on a tie.
    nearest = dist.argmin(-1)                                                      # (N, T)
    source = boxes.gather(1, nearest.unsqueeze(-1).expand(n, t, 4))
    filler = torch.cat([source[..., :2], torch.full_like(source[..., 2:], FILLER_SIZE)], dim=-1)
    return torch.where(valid.unsqueeze(-1), boxes, filler)


class ToClipTargets:
    """Final step: frames -> normalised float (T, 3, H, W); target -> what the clip matcher and criterion read.

    Output target (instance-major, n·T + t, only instances with at least one valid frame, in annotation
    order): boxes (N·T, 4) normalised cx, cy, w, h (absent frames: filler box, see
    :func:`fill_invalid_boxes`), labels (N·T,) int64 0-based instance label on every frame, valid (N·T,)
    bool, masks (N·T, H, W) bool, size (2,) (H, W), num_trajectories () int64; any other key of the input
    (orig_size, video_id, frame_ids) is passed through. A frame is valid when the annotation had it and its
    augmented mask has more than 2 pixels; with ``create_box_from_mask`` valid boxes are recomputed from the
    augmented masks (:func:`masks_to_boxes_xyxy`). ``bgr=True`` reverses the channels before normalising,
    as the official training did.
    """

    def __init__(self, num_frames: int, create_box_from_mask: bool = True, bgr: bool = False,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.num_frames = int(num_frames)
        self.create_box_from_mask = bool(create_box_from_mask)
        self.bgr = bool(bgr)
        self.mean, self.std = list(mean), list(std)

    def __call__(self, frames, target: dict):
        x = frames.as_subclass(Tensor)
        if self.bgr:
            x = x.flip(-3)
        x = F.normalize(x.to(torch.float32) / 255.0, self.mean, self.std)
        t_len = self.num_frames
        h, w = image_hw(x)
        masks = target["masks"].as_subclass(Tensor).bool()
        num_inst = masks.shape[0] // t_len
        boxes = target["boxes"].as_subclass(Tensor).to(torch.float32)
        valid = target["valid"].bool() & (masks.flatten(1).sum(1) > MIN_MASK_PIXELS)
        if self.create_box_from_mask:
            boxes = torch.where(valid.unsqueeze(1), masks_to_boxes_xyxy(masks), boxes)
        boxes = torch.where(valid.unsqueeze(1), boxes, torch.zeros_like(boxes))
        boxes = box_xyxy_to_cxcywh(boxes) / torch.tensor([w, h, w, h], dtype=torch.float32)
        keep = valid.view(num_inst, t_len).any(1)
        valid = valid.view(num_inst, t_len)[keep]
        boxes = fill_invalid_boxes(boxes.view(num_inst, t_len, 4)[keep], valid)
        labels = target["labels"].to(torch.int64)[keep]
        out = {k: v for k, v in target.items() if k not in ("boxes", "masks", "valid", "labels")}
        out.update({
            "boxes": boxes.reshape(-1, 4),
            "labels": labels.repeat_interleave(t_len),
            "valid": valid.reshape(-1),
            "masks": masks.view(num_inst, t_len, h, w)[keep].reshape(-1, h, w),
            "size": torch.tensor([h, w], dtype=torch.int64),
            "num_trajectories": torch.tensor(int(keep.sum()), dtype=torch.int64),
        })
        return x, out


def _scaled(values: Sequence[int], factor: float) -> list[int]:
    # int() truncation as in the official make_train_vis_transforms
    return [int(factor * v) for v in values]


def make_train_clip_transforms(num_frames: int, scale_factor: float = 1.0, multi_scale: bool = True,
                               create_box_from_mask: bool = True, bgr: bool = False,
                               wrap_overflow: bool = True, photometric: bool = True) -> v2.Compose:
    """The official DeVIS training augmentation for clips of ``num_frames`` frames (spec §6.2).

    multi_scale (INPUT.DEVIS.MULTI_SCALE_TRAIN): flip p=0.5; photometric distortion per frame; then with
    p=0.5 a resize of the short side to one of 288..512 (long ≤ 768), else resize to 400/500/600, crop in
    [384, 600] and the same multi-scale resize. Otherwise the ablations' fixed recipe: flip, resize short
    480..768 (long ≤ 800), photometric, resize 400/500/600, crop, resize short 300 (long ≤ 540). All sizes
    × ``scale_factor`` (INPUT.SCALE_FACTOR_TRAIN). Resizes are bilinear on frames, nearest on masks.
    ``photometric=False`` leaves colours alone (for inspecting the geometry).
    """
    pre = _scaled(VIS_CROP_PRE_RESIZES, scale_factor)
    crop = ClipRandomSizeCrop(*_scaled(VIS_CROP_SIZE_RANGE, scale_factor))
    colour = ClipPhotometricDistort(wrap_overflow) if photometric else v2.Identity()
    if multi_scale:
        scales = _scaled(VIS_TRAIN_SCALES, scale_factor)
        max_size = int(VIS_TRAIN_MAX_SIZE * scale_factor)
        steps = [
            v2.RandomHorizontalFlip(0.5),
            colour,
            v2.RandomChoice([
                RandomShortSideResize(scales, max_size),
                v2.Compose([RandomShortSideResize(pre), crop, RandomShortSideResize(scales, max_size)]),
            ]),
        ]
    else:
        steps = [
            v2.RandomHorizontalFlip(0.5),
            RandomShortSideResize(_scaled(FIXED_TRAIN_SCALES, scale_factor),
                                  int(FIXED_TRAIN_MAX_SIZE * scale_factor)),
            colour,
            RandomShortSideResize(pre),
            crop,
            RandomShortSideResize([int(FIXED_OUT_SIZE * scale_factor)], int(FIXED_OUT_MAX_SIZE * scale_factor)),
        ]
    return v2.Compose(steps + [ToClipTargets(num_frames, create_box_from_mask, bgr)])
