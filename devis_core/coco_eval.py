"""COCO box and mask AP through pycocotools, behind a reset / process / evaluate interface.

Predictions come in the image post-processor's format (0-based labels, xyxy boxes in original-image
pixels, bool masks at the original size); category id = label + 1 (spec §1).
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Iterable, Mapping

import numpy as np
import pycocotools.mask as mask_utils
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# Names of COCOeval.stats, in its order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def load_coco_gt(ann_file: str) -> COCO:
    """A pycocotools ``COCO`` index of an annotation file, without its console chatter."""
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(ann_file)


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def detections_to_coco(image_id: int, prediction: Mapping, iou_types: Iterable[str]) -> dict[str, list[dict]]:
    """COCO result entries of one image.

    prediction: scores (K,), labels (K,) 0-based, boxes (K, 4) xyxy pixels of the original image,
    and for 'segm' masks (K, H, W) or (K, 1, H, W) bool. Returns {iou_type: [entry, ...]}.
    """
    scores = _as_numpy(prediction["scores"]).astype(float).tolist()
    labels = _as_numpy(prediction["labels"]).astype(int).tolist()
    out: dict[str, list[dict]] = {}
    for iou_type in iou_types:
        entries = []
        if iou_type == "bbox":
            boxes = _as_numpy(prediction["boxes"]).astype(float).reshape(-1, 4)
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
            for s, lab, b in zip(scores, labels, xywh.tolist()):
                entries.append({"image_id": image_id, "category_id": lab + 1, "bbox": b, "score": s})
        elif iou_type == "segm":
            masks = _as_numpy(prediction["masks"]).astype(bool)
            if masks.ndim == 4:
                masks = masks[:, 0]
            for s, lab, m in zip(scores, labels, masks):
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                entries.append({"image_id": image_id, "category_id": lab + 1, "segmentation": rle, "score": s})
        else:
            raise ValueError(f"iou type {iou_type!r} is not supported; expected 'bbox' or 'segm'")
        out[iou_type] = entries
    return out


def _load_results(coco_gt: COCO, entries: list[dict]) -> COCO:
    if entries:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(copy.deepcopy(entries))
    # loadRes cannot take an empty list; an empty result set scores 0 wherever there is ground truth
    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                     "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        empty.createIndex()
    return empty


def _all_gather(obj):
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, obj)
        return gathered
    return [obj]


class CocoEvaluator:
    """Accumulates per-image predictions and scores them with pycocotools' COCOeval.

    Only the images passed to :meth:`process` are evaluated (the official loop evaluates the dataset's
    images that have annotations). Works under torch.distributed: :meth:`evaluate` gathers all ranks.
    """

    def __init__(self, coco_gt: COCO | str, iou_types: Iterable[str] = ("bbox", "segm"), verbose: bool = False):
        self.coco_gt = load_coco_gt(coco_gt) if isinstance(coco_gt, str) else coco_gt
        self.iou_types = tuple(iou_types)
        for t in self.iou_types:
            if t not in ("bbox", "segm"):
                raise ValueError(f"CocoEvaluator: iou type {t!r} is not supported; expected 'bbox' or 'segm'")
        self.verbose = verbose
        self.reset()

    def reset(self) -> None:
        """Forget everything processed so far."""
        self.image_ids: list[int] = []
        self.results: dict[str, list[dict]] = {t: [] for t in self.iou_types}

    def process(self, predictions: Mapping[int, Mapping]) -> None:
        """Add predictions: {image_id: {scores (K,), labels (K,) 0-based, boxes (K, 4) xyxy pixels,
        masks (K, H, W) bool at the original size (for 'segm')}}."""
        for image_id, pred in predictions.items():
            image_id = int(image_id)
            if image_id not in self.coco_gt.imgs:
                raise KeyError(f"CocoEvaluator: image id {image_id} is not in the ground-truth annotations")
            self.image_ids.append(image_id)
            for t, entries in detections_to_coco(image_id, pred, self.iou_types).items():
                self.results[t].extend(entries)

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Run COCOeval per iou type. Returns {'bbox': {AP, AP50, ..., ARl}, 'segm': {...}} (0..1;
        -1 where a metric has no ground truth, as pycocotools reports)."""
        image_ids = sorted({i for part in _all_gather(self.image_ids) for i in part})
        if not image_ids:
            raise ValueError("CocoEvaluator.evaluate: no image was processed")
        metrics = {}
        for t in self.iou_types:
            entries = [e for part in _all_gather(self.results[t]) for e in part]
            coco_dt = _load_results(self.coco_gt, entries)
            ev = COCOeval(self.coco_gt, coco_dt, iouType=t)
            ev.params.imgIds = image_ids
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            if self.verbose:
                print(f"COCO {t}:\n{out.getvalue()}")
            metrics[t] = {name: float(v) for name, v in zip(METRIC_NAMES, ev.stats)}
        return metrics


def build_coco_evaluator(cfg, ann_file: str) -> CocoEvaluator:
    """Evaluator over ``ann_file`` with 'bbox', plus 'segm' when MODEL.MASK_ON."""
    return CocoEvaluator(ann_file, ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",))
