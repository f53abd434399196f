"""Box geometry: format conversions, areas, IoU and the epsilon-regularised generalised IoU.

All functions are pure tensor functions that broadcast over leading dimensions. Boxes are either
``cxcywh`` (centre x, centre y, width, height) or ``xyxy`` (x0, y0, x1, y1), in any common unit
(normalised to [0, 1] or pixels) as long as both arguments share it.
"""
from __future__ import annotations

import torch
from torch import Tensor

# The official DeVIS box ops regularise IoU and GIoU with this constant (spec §6.3); stock DETR does
# not. It keeps the degenerate filler boxes of absent frames (w = h = 1e-6) from dividing by zero.
GIOU_EPS = 1e-6


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Convert centre/size boxes to corner boxes.

    boxes: (..., 4) cx, cy, w, h. Returns (..., 4) x0, y0, x1, y1 in the same unit.
    """
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """Convert corner boxes to centre/size boxes.

    boxes: (..., 4) x0, y0, x1, y1. Returns (..., 4) cx, cy, w, h in the same unit.
    """
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Convert COCO-style boxes (x, y, w, h; top-left corner) to corner boxes.

    boxes: (..., 4) x, y, w, h. Returns (..., 4) x0, y0, x1, y1.
    """
    x, y, w, h = boxes.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


def box_xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """Convert corner boxes to COCO-style boxes (x, y, w, h; top-left corner).

    boxes: (..., 4) x0, y0, x1, y1. Returns (..., 4) x, y, w, h.
    """
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of corner boxes.

    boxes: (..., 4) x0, y0, x1, y1 with x1 >= x0, y1 >= y0. Returns (...,) areas.
    """
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _check_well_formed(boxes: Tensor, name: str) -> None:
    # Inverted boxes give negative areas and silently wrong IoUs, so refuse them where they enter.
    ok = (boxes[..., 2:] >= boxes[..., :2]).all(-1)  # False for NaN too
    if boxes.numel() and not bool(ok.all()):
        bad = (~ok).nonzero()[0].tolist()
        raise ValueError(f"{name}: box at index {bad} is {boxes[tuple(bad)].tolist()}; expected finite "
                         f"xyxy boxes with x1 >= x0 and y1 >= y0")


def _intersection_union(boxes1: Tensor, boxes2: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    lt = torch.max(boxes1[..., :2], boxes2[..., :2])
    rb = torch.min(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    iou = (inter + eps) / (union + eps)
    return inter, union, iou


def box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = GIOU_EPS) -> Tensor:
    """Element-wise IoU of broadcastable corner boxes, ``(I + eps) / (U + eps)``.

    boxes1: (..., 4) xyxy; boxes2: (..., 4) xyxy, broadcastable against boxes1.
    Returns (...) IoU. For the pairwise (N, M) matrix pass ``boxes1[:, None]`` and ``boxes2[None]``
    or use :func:`pairwise_box_iou`. ``eps = 0`` gives the plain IoU (NaN for two empty boxes).
    """
    _check_well_formed(boxes1, "boxes1")
    _check_well_formed(boxes2, "boxes2")
    return _intersection_union(boxes1, boxes2, eps)[2]


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = GIOU_EPS, check: bool = True) -> Tensor:
    """Element-wise epsilon-regularised generalised IoU of broadcastable corner boxes.

    GIoU_eps = (I + eps) / (U + eps) - ((C - U) + eps) / (C + eps), C = area of the smallest
    enclosing box (spec §6.3). boxes1, boxes2: (..., 4) xyxy, broadcastable. Returns (...) in
    [-1, 1]. ``eps = 0`` gives stock GIoU. ``check=False`` skips the well-formedness check (two
    device-to-host syncs on a GPU) for callers that validate their boxes once elsewhere.
    """
    if check:
        _check_well_formed(boxes1, "boxes1")
        _check_well_formed(boxes2, "boxes2")
    _, union, iou = _intersection_union(boxes1, boxes2, eps)
    lt = torch.min(boxes1[..., :2], boxes2[..., :2])
    rb = torch.max(boxes1[..., 2:], boxes2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - ((enclosing - union) + eps) / (enclosing + eps)


def pairwise_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = GIOU_EPS) -> Tensor:
    """IoU matrix. boxes1: (N, 4) xyxy, boxes2: (M, 4) xyxy. Returns (N, M)."""
    return box_iou(boxes1[:, None], boxes2[None], eps)


def pairwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = GIOU_EPS) -> Tensor:
    """GIoU_eps matrix. boxes1: (N, 4) xyxy, boxes2: (M, 4) xyxy. Returns (N, M)."""
    return generalized_box_iou(boxes1[:, None], boxes2[None], eps)


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight corner boxes of binary masks, with the official pixel convention.

    masks: (N, H, W) bool or {0, 1}. Returns (N, 4) float xyxy where x1/y1 are the indices of the
    last foreground column/row (so w = x1 - x0 is one pixel less than the mask extent, as in the
    official ``masks_to_boxes``); empty masks give (0, 0, 0, 0).
    """
    if masks.dim() != 3:
        raise ValueError(f"masks: expected (N, H, W), got shape {tuple(masks.shape)}")
    n, h, w = masks.shape
    out = torch.zeros((n, 4), dtype=torch.float32, device=masks.device)
    if n == 0:
        return out
    fg = masks.bool()
    ys = torch.arange(h, device=masks.device, dtype=torch.float32)
    xs = torch.arange(w, device=masks.device, dtype=torch.float32)
    cols = fg.any(1)   # (N, W)
    rows = fg.any(2)   # (N, H)
    big = float(max(h, w))
    out[:, 0] = torch.where(cols, xs, big).amin(1)
    out[:, 2] = torch.where(cols, xs, -1.0).amax(1)
    out[:, 1] = torch.where(rows, ys, big).amin(1)
    out[:, 3] = torch.where(rows, ys, -1.0).amax(1)
    empty = ~cols.any(1)
    out[empty] = 0
    return out
