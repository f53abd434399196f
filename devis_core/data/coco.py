"""COCO-format instance datasets (official COCO layout and the synthetic set) and their batch collation.

Annotations are checked once when the dataset is built, images when they are read. A bad record raises
:class:`DatasetError` naming the annotation file (or image file), the image / annotation id and the field;
with ``skip_invalid=True`` (config ``DATASETS.SKIP_INVALID``) it is dropped with a warning instead:
a bad annotation drops that annotation, a bad image record or an unreadable image drops the image.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Callable, Sequence

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ..models.nested import NestedTensor, nested_tensor_from_tensor_list, pad_batch_to_multiple
from .registry import resolve_dataset
from .transforms import build_transforms, wrap_target
from .ytvis_format import DatasetError

__all__ = ["CocoInstances", "collate_fn", "build_coco_dataset", "load_coco_annotations"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _segmentation_problem(seg, height: int, width: int) -> str | None:
    """Why ``seg`` is not a usable COCO segmentation for an image of (height, width), or None."""
    if isinstance(seg, list):
        if not seg:
            return "is an empty polygon list"
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2 or not all(_is_num(v) for v in poly):
                return f"polygon {k} must be a list of at least 6 finite numbers (x, y pairs)"
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and list(size) == [height, width]):
            return f"RLE size {size!r} must be [height, width] = [{height}, {width}]"
        if not isinstance(counts, (str, list)):
            return f"RLE counts must be a string or a list of ints, got {type(counts).__name__}"
        if isinstance(counts, list) and (not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != height * width):
            return f"uncompressed RLE counts must be non-negative ints summing to {height * width}"
        return None
    return f"must be a polygon list or an RLE dict, got {type(seg).__name__}"


def load_coco_annotations(ann_file: str, num_classes: int | None = None, need_masks: bool = True,
                          skip_invalid: bool = False) -> tuple[dict, dict, dict]:
    """Read and check a COCO instances file.

    Returns (images {image_id: record}, annotations {image_id: [annotation, ...]}, categories
    {category_id: record}). Category ids must be in 1..num_classes (class index = id − 1) when
    ``num_classes`` is given. Raises DatasetError on the first problem unless ``skip_invalid``.
    """
    def problem(msg: str) -> None:
        if not skip_invalid:
            raise DatasetError(msg)
        warnings.warn(f"skipped: {msg}", stacklevel=3)

    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{ann_file}: annotation file does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{ann_file}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file}: expected a JSON object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{ann_file}: field {key!r} must be a list, got {type(data.get(key)).__name__}")

    categories = {}
    for i, cat in enumerate(data["categories"]):
        cid = cat.get("id") if isinstance(cat, dict) else None
        if not _is_int(cid) or cid < 1 or (num_classes is not None and cid > num_classes):
            limit = f"1..{num_classes}" if num_classes is not None else ">= 1"
            raise DatasetError(f"{ann_file}: categories[{i}]: field 'id' is {cid!r}, expected an int in {limit} "
                               f"(class index = id - 1)")
        categories[cid] = cat

    images = {}
    for i, img in enumerate(data["images"]):
        iid = img.get("id") if isinstance(img, dict) else None
        where = f"{ann_file}: images[{i}] (image id {iid!r})"
        if not _is_int(iid):
            problem(f"{where}: field 'id' must be an int")
            continue
        if iid in images:
            problem(f"{where}: duplicate image id")
            continue
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            problem(f"{where}: field 'file_name' must be a non-empty string, got {img.get('file_name')!r}")
            continue
        bad = [k for k in ("height", "width") if not (_is_int(img.get(k)) and img[k] > 0)]
        if bad:
            problem(f"{where}: field {bad[0]!r} must be a positive int, got {img.get(bad[0])!r}")
            continue
        images[iid] = img

    anns: dict[int, list] = {iid: [] for iid in images}
    seen_ids = set()
    for i, ann in enumerate(data["annotations"]):
        aid = ann.get("id") if isinstance(ann, dict) else None
        iid = ann.get("image_id") if isinstance(ann, dict) else None
        where = f"{ann_file}: annotation id {aid!r} (annotations[{i}], image id {iid!r})"
        if not _is_int(aid) or aid in seen_ids:
            problem(f"{where}: field 'id' must be a unique int")
            continue
        seen_ids.add(aid)
        if iid not in images:
            if _is_int(iid) and any(r.get("id") == iid for r in data["images"]):
                continue  # its image record was skipped above, already reported
            problem(f"{where}: field 'image_id' refers to no image of the file")
            continue
        if ann.get("category_id") not in categories:
            problem(f"{where}: field 'category_id' is {ann.get('category_id')!r}, expected one of the "
                    f"file's category ids")
            continue
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_num(v) for v in bbox)
                and bbox[2] >= 0 and bbox[3] >= 0):
            problem(f"{where}: field 'bbox' is {bbox!r}, expected [x, y, w, h] finite numbers with w, h >= 0")
            continue
        if "area" in ann and not (_is_num(ann["area"]) and ann["area"] >= 0):
            problem(f"{where}: field 'area' is {ann['area']!r}, expected a non-negative number")
            continue
        if ann.get("iscrowd", 0) not in (0, 1):
            problem(f"{where}: field 'iscrowd' is {ann.get('iscrowd')!r}, expected 0 or 1")
            continue
        if need_masks:
            img = images[iid]
            why = _segmentation_problem(ann.get("segmentation"), img["height"], img["width"])
            if why:
                problem(f"{where}: field 'segmentation' {why}")
                continue
        anns[iid].append(ann)
    return images, anns, categories


def _decode_masks(anns: Sequence[dict], height: int, width: int) -> Tensor:
    """(N, H, W) uint8 masks of the annotations' polygons / RLEs (a union for multi-polygon objects)."""
    masks = np.zeros((len(anns), height, width), dtype=np.uint8)
    for n, ann in enumerate(anns):
        seg = ann["segmentation"]
        if isinstance(seg, list) or isinstance(seg.get("counts"), list):
            rles = mask_utils.frPyObjects(seg, height, width)
        else:
            rles = [seg]
        with warnings.catch_warnings():
            # pycocotools' Cython decoder trips NumPy 2's __array__(copy=...) deprecation; harmless
            warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword",
                                    category=DeprecationWarning)
            m = mask_utils.decode(rles)
        masks[n] = m.max(axis=2) if m.ndim == 3 else m
    return torch.from_numpy(masks)


class CocoInstances(Dataset):
    """A COCO-format instance-segmentation dataset.

    Item: (image (3, H, W) float normalised, target) with target = labels (n,) int64 0-based
    (category id − 1), boxes (n, 4) normalised cx, cy, w, h, masks (n, H, W) bool (if
    ``return_masks``), size (2,) and orig_size (2,) as (h, w), image_id (). Crowd annotations and
    boxes of zero area after clipping are left out, as in the official code; COCO evaluation reads
    areas and crowd flags from the annotation file, not from these targets.
    """

    def __init__(self, image_root: str, ann_file: str, transforms: Callable | None = None,
                 return_masks: bool = True, num_classes: int | None = None, skip_invalid: bool = False,
                 remove_images_without_annotations: bool = True):
        self.image_root = image_root
        self.ann_file = ann_file
        self.transforms = transforms
        self.return_masks = return_masks
        self.skip_invalid = skip_invalid
        self.images, self.anns, self.categories = load_coco_annotations(
            ann_file, num_classes, return_masks, skip_invalid)
        ids = sorted(self.images)
        if remove_images_without_annotations:
            # official: keep images that have any annotation, crowd ones included
            ids = [i for i in ids if self.anns[i]]
        self.ids = ids
        self.skipped_image_ids: list[int] = []

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, image_id: int) -> str:
        """Absolute path of an image's file."""
        return os.path.join(self.image_root, self.images[image_id]["file_name"])

    def load_image(self, image_id: int) -> Image.Image:
        """Read an image as RGB; DatasetError naming the file and image id if missing, corrupt or of
        another size than its annotation record."""
        path = self.image_path(image_id)
        if not os.path.isfile(path):
            raise DatasetError(f"{path}: image file of image id {image_id} (in {self.ann_file}) does not exist")
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DatasetError(f"{path}: image id {image_id} cannot be decoded ({err})") from err
        rec = self.images[image_id]
        if (image.height, image.width) != (rec["height"], rec["width"]):
            raise DatasetError(f"{path}: image id {image_id} is {image.height}x{image.width} (HxW) but "
                               f"{self.ann_file} says {rec['height']}x{rec['width']}")
        return image

    def raw_target(self, image_id: int, height: int, width: int) -> dict:
        """Untransformed target: boxes (n, 4) xyxy pixels clipped to the image, labels, masks uint8."""
        anns = [a for a in self.anns[image_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=width)
        boxes[:, 1::2].clamp_(min=0, max=height)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        target = {
            "boxes": boxes[keep],
            "labels": torch.tensor([a["category_id"] - 1 for a in anns], dtype=torch.int64)[keep],
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "size": torch.tensor([height, width], dtype=torch.int64),
        }
        if self.return_masks:
            target["masks"] = _decode_masks(anns, height, width)[keep]
        return target

    def _get(self, idx: int):
        image_id = self.ids[idx]
        image = self.load_image(image_id)
        target = wrap_target(self.raw_target(image_id, image.height, image.width), (image.height, image.width))
        if self.transforms is not None:
            return self.transforms(image, target)
        return image, target

    def __getitem__(self, idx: int):
        if not self.skip_invalid:
            return self._get(idx)
        for attempt in range(len(self.ids)):
            j = (idx + attempt) % len(self.ids)
            try:
                return self._get(j)
            except DatasetError as err:
                # skip mode: report and use the next image so that a batch is still filled
                warnings.warn(f"skipped: {err}", stacklevel=2)
                self.skipped_image_ids.append(self.ids[j])
        raise DatasetError(f"{self.ann_file}: no readable image left in the dataset")


def collate_fn(batch: Sequence[tuple[Tensor, dict]], pad_multiple: int = 0) -> tuple[NestedTensor, list[dict]]:
    """Pad a batch of (image (3, H_i, W_i), target) to the largest H and W, rounded up to multiples of
    ``pad_multiple`` when it is > 0 (INPUT.TRAIN_PAD_MULTIPLE; target masks padded to match).

    Returns (NestedTensor(tensors (B, 3, H, W), mask (B, H, W) True on padding), list of targets).
    """
    images, targets = zip(*batch)
    return pad_batch_to_multiple(nested_tensor_from_tensor_list(list(images)), targets, pad_multiple)


def build_coco_dataset(cfg, split: str) -> tuple[CocoInstances, int]:
    """The dataset named by DATASETS.TRAIN_DATASET (split 'train') or DATASETS.VAL_DATASET ('val'),
    with the matching transforms, MODEL.MASK_ON masks and DATASETS.SKIP_INVALID.

    Returns (dataset, num_classes).
    """
    if split not in ("train", "val"):
        raise ValueError(f"build_coco_dataset: split is {split!r}, expected 'train' or 'val'")
    name = cfg.DATASETS.TRAIN_DATASET if split == "train" else cfg.DATASETS.VAL_DATASET
    kind, image_root, ann_file, num_classes = resolve_dataset(cfg.DATASETS.DATA_PATH, name)
    if kind != "coco":
        raise DatasetError(f"dataset {name!r} is a {kind!r} dataset; build_coco_dataset needs a COCO one")
    dataset = CocoInstances(image_root, ann_file, build_transforms(cfg, split == "train"),
                            return_masks=bool(cfg.MODEL.MASK_ON), num_classes=num_classes,
                            skip_invalid=cfg.DATASETS.SKIP_INVALID)
    return dataset, num_classes
