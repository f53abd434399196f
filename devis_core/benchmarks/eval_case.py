"""Seeded YouTube-VIS-sized evaluation cases: ground truth and predictions as RLEs of moving ellipses.

Nothing is rendered: each mask is an ellipse whose per-column pixel runs are computed directly and
packed into COCO's RLE, so a validation-sized case (300 videos x 36 frames at 720p, 100 predictions
per video, about a million masks) is built in well under a minute. Predictions are noisy copies of
the ground truth (some with the wrong class, some covering only part of the frames) plus low-scored
false positives, in the proportions a tracker's top-100 output tends to have.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pycocotools.mask as mask_utils
from devis_core.fileio import atomic_write

__all__ = ["ellipse_rle", "make_eval_case", "write_eval_case"]

# Objects smaller than this on a frame are written as absent (null), like tiny tracker masks.
MIN_PIXELS = 12


def ellipse_rle(cx: float, cy: float, rx: float, ry: float, height: int, width: int):
    """Compressed RLE of the pixels whose centres lie in an axis-aligned ellipse, clipped to the frame.

    cx, cy: centre in pixels (x right, y down); rx, ry: semi-axes in pixels.
    Returns ``(rle, area, bbox)``: rle ``{"size": [H, W], "counts": str}``, area in pixels and bbox
    ``[x, y, w, h]``; ``(None, 0, None)`` when fewer than MIN_PIXELS pixels are inside the frame.
    """
    x0 = max(int(np.ceil(cx - rx - 0.5)), 0)
    x1 = min(int(np.floor(cx + rx - 0.5)), width - 1)
    if x1 < x0 or rx <= 0 or ry <= 0:
        return None, 0, None
    xs = np.arange(x0, x1 + 1)
    u = (xs + 0.5 - cx) / rx
    half = ry * np.sqrt(np.clip(1.0 - u * u, 0.0, None))
    y0 = np.clip(np.ceil(cy - half - 0.5), 0, height).astype(np.int64)
    y1 = np.clip(np.floor(cy + half - 0.5) + 1, 0, height).astype(np.int64)
    keep = y1 > y0
    area = int((y1 - y0)[keep].sum())
    if area < MIN_PIXELS:
        return None, 0, None
    xs, y0, y1 = xs[keep], y0[keep], y1[keep]
    # COCO RLE runs over the column-major (Fortran) pixel order: alternating background/foreground.
    starts, ends = xs * height + y0, xs * height + y1
    joined = ends[:-1] == starts[1:]  # a run that reaches a column's bottom and goes on at the next top
    starts = starts[np.concatenate(([True], ~joined))]
    ends = ends[np.concatenate((~joined, [True]))]
    bounds = np.empty(2 * len(starts) + 2, dtype=np.int64)
    bounds[0], bounds[-1] = 0, height * width
    bounds[1:-1:2], bounds[2:-1:2] = starts, ends
    counts = np.diff(bounds)
    if counts[-1] == 0:
        counts = counts[:-1]
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)
    bbox = [float(xs[0]), float(y0.min()), float(xs[-1] + 1 - xs[0]), float(y1.max() - y0.min())]
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}, area, bbox


def _path(rng: np.random.Generator, length: int, height: int, width: int, scale: float) -> np.ndarray:
    """(length, 4) cx, cy, rx, ry of an ellipse moving on a straight line and slowly changing size."""
    r0 = rng.uniform(0.04, 0.25) * scale * min(height, width) * np.array([rng.uniform(0.6, 1.6), 1.0])
    start = rng.uniform([0.1 * width, 0.1 * height], [0.9 * width, 0.9 * height])
    velocity = rng.normal(0.0, 0.008, 2) * np.array([width, height])
    growth = rng.uniform(-0.01, 0.01)
    t = np.arange(length)[:, None]
    centre = start + velocity * t
    radii = r0 * (1.0 + growth * t)
    return np.concatenate([centre, np.clip(radii, 1.0, None)], axis=1)


def _masks(params: np.ndarray, present: np.ndarray, height: int, width: int):
    """Per-frame (rle | None, area | None, bbox | None) of an ellipse path where ``present``."""
    out = []
    for (cx, cy, rx, ry), here in zip(params, present):
        out.append(ellipse_rle(cx, cy, rx, ry, height, width) if here else (None, 0, None))
    return out


def _interval(rng: np.random.Generator, length: int, full_prob: float) -> np.ndarray:
    """(length,) bool: all frames with probability full_prob, else one random stretch of frames."""
    if rng.random() < full_prob or length < 3:
        return np.ones(length, dtype=bool)
    a = int(rng.integers(0, length - 1))
    b = int(rng.integers(a + 1, length + 1))
    present = np.zeros(length, dtype=bool)
    present[a:b] = True
    return present


def make_eval_case(num_videos: int = 300, num_frames: int = 36, size: tuple[int, int] = (720, 1280),
                   preds_per_video: int = 100, num_categories: int = 40, seed: int = 0,
                   gt_per_video: tuple[int, int] = (1, 4)) -> tuple[dict, list[dict]]:
    """A ground-truth dict (YouTube-VIS format) and a results list, deterministic for a given seed.

    Videos have between ``num_frames // 2`` and ``num_frames`` frames of ``size`` = (H, W) pixels and
    ``gt_per_video`` = (lo, hi) instances (inclusive), some of which appear late or leave early.
    Each video gets exactly ``preds_per_video`` predictions: 1-3 noisy copies per instance (the first
    with the right class and a high score) and low-scored false positives.
    """
    height, width = size
    if num_videos < 1 or num_frames < 1 or preds_per_video < 0 or num_categories < 1:
        raise ValueError("num_videos, num_frames and num_categories must be >= 1, preds_per_video >= 0")
    rng = np.random.default_rng(seed)
    categories = [{"id": k + 1, "name": f"class_{k + 1:02d}", "supercategory": "object"}
                  for k in range(num_categories)]
    videos, annotations, results = [], [], []
    for vid in range(1, num_videos + 1):
        length = int(rng.integers(max(1, num_frames // 2), num_frames + 1))
        videos.append({"id": vid, "height": height, "width": width, "length": length,
                       "file_names": [f"video{vid:05d}/{t:05d}.jpg" for t in range(length)]})
        instances = []
        for _ in range(int(rng.integers(gt_per_video[0], gt_per_video[1] + 1))):
            params = _path(rng, length, height, width, scale=1.0)
            present = _interval(rng, length, full_prob=0.7)
            frames = _masks(params, present, height, width)
            if all(r is None for r, _, _ in frames):
                continue
            cat = int(rng.integers(1, num_categories + 1))
            instances.append((params, present, cat))
            annotations.append({
                "id": len(annotations) + 1, "video_id": vid, "category_id": cat, "iscrowd": 0,
                "height": height, "width": width, "length": length,
                "segmentations": [r for r, _, _ in frames],
                "areas": [float(a) if r is not None else None for r, a, _ in frames],
                "bboxes": [b for _, _, b in frames]})
        preds = []
        for params, present, cat in instances:
            for copy in range(int(rng.integers(1, 4))):
                noise = 0.03 if copy == 0 else 0.12
                jitter = rng.normal(0.0, noise, params.shape) * params[:, 2:3].repeat(4, axis=1)
                keep = present if copy == 0 else present & _interval(rng, length, full_prob=0.5)
                wrong = copy > 0 and rng.random() < 0.5
                pcat = int(rng.integers(1, num_categories + 1)) if wrong else cat
                score = rng.uniform(0.5, 0.95) if copy == 0 else rng.uniform(0.1, 0.7)
                preds.append((params + jitter, keep, pcat, score))
        gt_cats = [c for _, _, c in instances] or [1]
        while len(preds) < preds_per_video:
            params = _path(rng, length, height, width, scale=0.5)
            cat = int(rng.choice(gt_cats)) if rng.random() < 0.5 else int(rng.integers(1, num_categories + 1))
            preds.append((params, _interval(rng, length, full_prob=0.5), cat, rng.uniform(0.0, 0.3)))
        for params, keep, cat, score in preds[:preds_per_video]:
            results.append({"video_id": vid, "category_id": cat, "score": float(score),
                            "segmentations": [r for r, _, _ in _masks(params, keep, height, width)]})
    gt = {"info": {"description": f"synthetic evaluation case, seed {seed}"}, "licenses": [],
          "videos": videos, "categories": categories, "annotations": annotations}
    return gt, results


def _atomic_json(path: str, obj) -> None:
    atomic_write(path, lambda fh: json.dump(obj, fh, separators=(",", ":")), mode="w")


def write_eval_case(folder: str, **kwargs) -> tuple[str, str]:
    """Build a case with ``make_eval_case(**kwargs)`` and write ``gt.json`` and ``results.json``.

    Returns the two paths. Files are written atomically.
    """
    os.makedirs(folder, exist_ok=True)
    gt, results = make_eval_case(**kwargs)
    gt_path, res_path = os.path.join(folder, "gt.json"), os.path.join(folder, "results.json")
    _atomic_json(gt_path, gt)
    _atomic_json(res_path, results)
    return gt_path, res_path
