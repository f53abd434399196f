"""Read-only index over a YouTube-VIS / OVIS annotation file: videos, frames, per-frame instance masks."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

__all__ = [
    "DatasetError",
    "Instance",
    "VideoIndex",
    "load_ytvis",
    "load_json",
    "rle_string_to_counts",
    "segmentation_to_rle",
    "decode_segmentation",
    "mask_to_box",
]


class DatasetError(ValueError):
    """An annotation file or dataset folder does not hold what the YouTube-VIS / COCO format requires."""


@dataclass
class Instance:
    """One annotated object on one frame.

    mask: (H, W) bool, the visible pixels.
    box: x, y, w, h in pixels (the annotation's bbox; from the mask when the bbox is null).
    """

    ann_id: int
    category_id: int
    mask: np.ndarray
    box: tuple[float, float, float, float]
    area: float
    iscrowd: int


def load_json(path: str) -> object:
    """Parse a JSON file; a missing file or a syntax error becomes a DatasetError naming the file."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: annotation file not found")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text: {exc}") from exc


def rle_string_to_counts(counts: str) -> list[int]:
    """Expand COCO's compressed RLE string into run lengths.

    pycocotools decodes without bounds checks, so a corrupt string can overrun its buffer; parsing it
    here first lets callers check that the runs add up to H*W before handing it to the C code.
    The format: each run is a little-endian base-32 number in 6-bit chars (offset 48, bit 5 = "more",
    bit 4 of the last char = sign); runs from the third on are stored as deltas to the run two back.
    Raises ValueError on characters outside the alphabet or a truncated number.
    """
    runs: list[int] = []
    pos = 0
    n = len(counts)
    while pos < n:
        value = 0
        shift = 0
        while True:
            if pos >= n:
                raise ValueError("compressed RLE string ends inside a run length")
            c = ord(counts[pos]) - 48
            if c < 0 or c > 63:
                raise ValueError(f"character {counts[pos]!r} at {pos} is outside the RLE alphabet")
            value |= (c & 0x1F) << shift
            shift += 5
            pos += 1
            if not c & 0x20:
                if c & 0x10:
                    value |= -1 << shift
                break
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _rle_runs(seg: dict, height: int, width: int) -> list[int]:
    """Run lengths of an RLE dict (compressed or not), checked to cover exactly (height, width)."""
    size = seg.get("size")
    counts = seg.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) for s in size)):
        raise ValueError(f"RLE 'size' must be [height, width], got {size!r}")
    if list(size) != [height, width]:
        raise ValueError(f"RLE size {size} differs from the video size [{height}, {width}]")
    if isinstance(counts, str):
        runs, kind = rle_string_to_counts(counts), "compressed"
    elif isinstance(counts, list):
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in counts):
            raise ValueError("uncompressed RLE 'counts' must be integers")
        runs, kind = counts, "uncompressed"
    else:
        raise ValueError(f"RLE 'counts' must be a string or a list of integers, got {type(counts).__name__}")
    if any(r < 0 for r in runs):
        raise ValueError(f"{kind} RLE has a negative run length")
    if sum(runs) != height * width:
        raise ValueError(f"{kind} RLE runs sum to {sum(runs)}, expected {height * width}")
    return runs


def _check_polygons(seg: list) -> None:
    if not seg or not all(
        isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(isinstance(v, (int, float)) for v in p)
        for p in seg
    ):
        raise ValueError("polygon segmentation must be a list of [x1, y1, x2, y2, ...] lists of >= 3 points")


def segmentation_to_rle(seg: object, height: int, width: int) -> dict:
    """Turn one frame's segmentation (any of the three encodings) into a pycocotools RLE of (height, width).

    seg: compressed RLE {size, counts: str}, uncompressed RLE {size, counts: [int]} or polygons [[x, y, ...]].
    Returns {size, counts: bytes}. Raises ValueError (the caller adds the file/id context) when malformed
    or of another size.
    """
    if isinstance(seg, dict):
        _rle_runs(seg, height, width)
        if isinstance(seg["counts"], str):
            return {"size": [height, width], "counts": seg["counts"].encode("ascii")}
        return mask_utils.frPyObjects(seg, height, width)
    if isinstance(seg, list):
        _check_polygons(seg)
        return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    raise ValueError(f"segmentation must be an RLE dict or a polygon list, got {type(seg).__name__}")


def decode_segmentation(seg: object, height: int, width: int) -> np.ndarray:
    """Decode one frame's segmentation to a mask.

    seg: compressed RLE {size, counts: str}, uncompressed RLE {size, counts: [int]} or polygons [[x, y, ...]].
    Returns (height, width) bool. Raises ValueError when malformed or of another size.
    """
    if isinstance(seg, dict):
        # RLE is expanded in numpy from the already-validated runs: no second parse in C, and no
        # unchecked write past the buffer for a corrupt file.
        runs = _rle_runs(seg, height, width)
        values = np.zeros(len(runs), dtype=bool)
        values[1::2] = True
        # COCO runs go down the columns (Fortran order), alternating background / object from background.
        return np.ascontiguousarray(np.repeat(values, runs).reshape(width, height).T)
    return mask_utils.decode(segmentation_to_rle(seg, height, width)).astype(bool)


def mask_to_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight box of a mask in COCO convention.

    mask: (H, W) bool. Returns x, y, w, h in pixels with w = x_max - x_min + 1 (pycocotools.toBbox);
    (0, 0, 0, 0) for an empty mask.
    """
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(xs) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs[0]), float(ys[0]), float(xs[-1] - xs[0] + 1), float(ys[-1] - ys[0] + 1))


def _require(record: dict, key: str, types: tuple, where: str, ann_file: str):
    if not isinstance(record, dict):
        raise DatasetError(f"{ann_file}: {where}: expected an object, got {type(record).__name__}")
    if key not in record:
        raise DatasetError(f"{ann_file}: {where}: required field '{key}' is missing")
    value = record[key]
    # bool is an int subclass; an id of `true` is a data error, not an id of 1.
    if isinstance(value, bool) or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise DatasetError(f"{ann_file}: {where}: field '{key}' must be {names}, got {type(value).__name__}")
    return value


class VideoIndex:
    """Videos, frame paths and per-frame instances of one YouTube-VIS-format annotation file.

    Built by `load_ytvis`. Masks are decoded on demand, so building the index of a large file is cheap.
    """

    def __init__(self, ann_file: str, image_root: str, categories: dict[int, str], videos: list[dict],
                 annotations: list[dict]):
        self.ann_file = ann_file
        self.image_root = image_root
        self.categories = categories
        self.videos = videos
        self._video_by_id = {v["id"]: v for v in videos}
        self._anns_by_video: dict[int, list[dict]] = {v["id"]: [] for v in videos}
        for ann in annotations:
            self._anns_by_video[ann["video_id"]].append(ann)

    def __len__(self) -> int:
        return len(self.videos)

    def __repr__(self) -> str:
        return (f"VideoIndex({self.ann_file!r}, videos={len(self.videos)}, "
                f"categories={len(self.categories)}, frames={sum(len(v['file_names']) for v in self.videos)})")

    def video(self, video_id: int) -> dict:
        """The JSON record of a video; DatasetError when the id is not in the file."""
        try:
            return self._video_by_id[video_id]
        except KeyError:
            raise DatasetError(f"{self.ann_file}: video id {video_id!r} is not in the file") from None

    def video_ids(self) -> list[int]:
        """Video ids in file order."""
        return [v["id"] for v in self.videos]

    def num_frames(self, video_id: int) -> int:
        """Number of frames (= len(file_names)) of a video."""
        return len(self.video(video_id)["file_names"])

    def _check_t(self, video_id: int, t: int) -> dict:
        video = self.video(video_id)
        n = len(video["file_names"])
        if not isinstance(t, (int, np.integer)) or not 0 <= t < n:
            raise IndexError(f"{self.ann_file}: video {video_id}: frame index {t!r} outside 0..{n - 1}")
        return video

    def frame_path(self, video_id: int, t: int) -> str:
        """Absolute path of frame t of a video."""
        video = self._check_t(video_id, t)
        return os.path.abspath(os.path.join(self.image_root, video["file_names"][t]))

    def load_frame(self, video_id: int, t: int) -> np.ndarray:
        """Frame t as (H, W, 3) uint8 RGB."""
        path = self.frame_path(video_id, t)
        if not os.path.isfile(path):
            raise DatasetError(f"{self.ann_file}: video {video_id}: frame {t} not found at {path}")
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))

    def annotations(self, video_id: int) -> list[dict]:
        """The JSON annotation records of a video, in file order."""
        self.video(video_id)
        return self._anns_by_video[video_id]

    def instances(self, video_id: int, t: int) -> list[Instance]:
        """Instances with a non-null segmentation on frame t, in annotation order.

        Each Instance.mask is (H, W) bool at the video's size.
        """
        video = self._check_t(video_id, t)
        height, width = video["height"], video["width"]
        out = []
        for ann in self._anns_by_video[video_id]:
            seg = ann["segmentations"][t]
            if seg is None:
                continue
            try:
                mask = decode_segmentation(seg, height, width)
            except ValueError as exc:
                raise DatasetError(
                    f"{self.ann_file}: annotation {ann['id']} (video {video_id}): segmentations[{t}]: {exc}"
                ) from exc
            bboxes = ann.get("bboxes")
            box = bboxes[t] if bboxes is not None else None
            box = tuple(float(v) for v in box) if box is not None else mask_to_box(mask)
            areas = ann.get("areas")
            area = areas[t] if areas is not None else None
            area = float(area) if area is not None else float(mask.sum())
            out.append(Instance(ann_id=ann["id"], category_id=ann["category_id"], mask=mask, box=box,
                                area=area, iscrowd=int(ann.get("iscrowd", 0))))
        return out


def load_ytvis(ann_file: str, image_root: str) -> VideoIndex:
    """Read a YouTube-VIS / OVIS annotation file into a VideoIndex.

    Checks the fields the index relies on and raises DatasetError naming the file, the video or
    annotation id and the field on the first problem (data_scripts/check_dataset.py lists them all).
    `annotations` may be missing or null (test splits without ground truth).
    """
    ann_file = os.path.abspath(ann_file)
    data = load_json(ann_file)
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file}: top level must be an object with 'videos', 'annotations', 'categories'")
    videos = _require(data, "videos", (list,), "top level", ann_file)
    cats = _require(data, "categories", (list,), "top level", ann_file)
    anns = data.get("annotations")
    if anns is None:
        anns = []
    elif not isinstance(anns, list):
        raise DatasetError(f"{ann_file}: top level: field 'annotations' must be list or null, "
                           f"got {type(anns).__name__}")

    categories: dict[int, str] = {}
    for i, cat in enumerate(cats):
        cid = _require(cat, "id", (int,), f"categories[{i}]", ann_file)
        name = _require(cat, "name", (str,), f"category {cid}", ann_file)
        if cid in categories:
            raise DatasetError(f"{ann_file}: category {cid}: field 'id' is duplicated")
        categories[cid] = name

    lengths: dict[int, int] = {}
    for i, video in enumerate(videos):
        vid = _require(video, "id", (int,), f"videos[{i}]", ann_file)
        where = f"video {vid}"
        if vid in lengths:
            raise DatasetError(f"{ann_file}: {where}: field 'id' is duplicated")
        for key in ("width", "height"):
            if _require(video, key, (int,), where, ann_file) <= 0:
                raise DatasetError(f"{ann_file}: {where}: field '{key}' must be positive")
        names = _require(video, "file_names", (list,), where, ann_file)
        if not all(isinstance(n, str) for n in names):
            raise DatasetError(f"{ann_file}: {where}: field 'file_names' must hold strings")
        if "length" in video and video["length"] != len(names):
            raise DatasetError(f"{ann_file}: {where}: field 'length' is {video['length']!r} but "
                               f"file_names has {len(names)} entries")
        lengths[vid] = len(names)

    seen: set[int] = set()
    for i, ann in enumerate(anns):
        aid = _require(ann, "id", (int,), f"annotations[{i}]", ann_file)
        where = f"annotation {aid}"
        if aid in seen:
            raise DatasetError(f"{ann_file}: {where}: field 'id' is duplicated")
        seen.add(aid)
        vid = _require(ann, "video_id", (int,), where, ann_file)
        if vid not in lengths:
            raise DatasetError(f"{ann_file}: {where}: field 'video_id' refers to unknown video {vid}")
        cid = _require(ann, "category_id", (int,), where, ann_file)
        if cid not in categories:
            raise DatasetError(f"{ann_file}: {where}: field 'category_id' refers to unknown category {cid}")
        segs = _require(ann, "segmentations", (list,), where, ann_file)
        if len(segs) != lengths[vid]:
            raise DatasetError(f"{ann_file}: {where}: field 'segmentations' has {len(segs)} entries, "
                               f"video {vid} has {lengths[vid]} frames")
        for key in ("bboxes", "areas"):
            value = ann.get(key)
            if value is not None and (not isinstance(value, list) or len(value) != lengths[vid]):
                raise DatasetError(f"{ann_file}: {where}: field '{key}' must be a list of {lengths[vid]} "
                                   f"entries (one per frame)")
    return VideoIndex(ann_file, os.path.abspath(image_root), categories, videos, anns)
