"""Validate a YouTube-VIS / OVIS / COCO annotation file against its frames; list every problem found."""

from __future__ import annotations

import os
from dataclasses import dataclass

from PIL import Image

from .ytvis_format import DatasetError, segmentation_to_rle, load_json

__all__ = ["Problem", "check_ytvis", "check_coco", "check_dataset", "detect_format"]


@dataclass(frozen=True)
class Problem:
    """One defect: the file, the record it is in (e.g. "video 3", "annotation 12"), the field and what is wrong."""

    file: str
    where: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.where}: {self.field}: {self.message}"


class _Report:
    def __init__(self, file: str):
        self.file = file
        self.problems: list[Problem] = []

    def add(self, where: str, field: str, message: str) -> None:
        self.problems.append(Problem(self.file, where, field, message))


def _is_int(v) -> bool:
    # JSON true/false load as bool, which Python counts as int; they are never valid ids or sizes.
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_name(v) -> str:
    return "null" if v is None else type(v).__name__


def _load(report: _Report, ann_file: str):
    try:
        data = load_json(ann_file)
    except DatasetError as exc:
        report.add("file", "json", str(exc).split(": ", 1)[-1])
        return None
    if not isinstance(data, dict):
        report.add("top level", "json", f"expected an object, got {_type_name(data)}")
        return None
    return data


def _top_list(report: _Report, data: dict, key: str, optional: bool = False) -> list:
    if key not in data or (optional and data[key] is None):
        if not optional:
            report.add("top level", key, "required field is missing")
        return []
    if not isinstance(data[key], list):
        report.add("top level", key, f"must be a list, got {_type_name(data[key])}")
        return []
    return data[key]


def _record_id(report: _Report, record, index: int, kind: str, seen: set, plural: str):
    """Validate a record's id; returns (where-string, id or None)."""
    if not isinstance(record, dict):
        report.add(f"{plural}[{index}]", "record", f"must be an object, got {_type_name(record)}")
        return None, None
    rid = record.get("id")
    if not _is_int(rid):
        where = f"{plural}[{index}]"
        report.add(where, "id", "required field is missing" if "id" not in record else
                   f"must be an integer, got {_type_name(rid)}")
        return where, None
    where = f"{kind} {rid}"
    if rid in seen:
        report.add(where, "id", f"duplicate {kind} id {rid} ({plural}[{index}])")
    seen.add(rid)
    return where, rid


def _check_categories(report: _Report, cats: list) -> set:
    known: set = set()
    for i, cat in enumerate(cats):
        where, cid = _record_id(report, cat, i, "category", known, "categories")
        if where is not None and not isinstance(cat.get("name"), str):
            report.add(where, "name", f"must be a string, got {_type_name(cat.get('name'))}")
    return known


def _positive_int(report: _Report, record: dict, where: str, key: str):
    value = record.get(key)
    if key not in record:
        report.add(where, key, "required field is missing")
    elif not _is_int(value) or value <= 0:
        report.add(where, key, f"must be a positive integer, got {value!r}")
    else:
        return value
    return None


def _check_image(report: _Report, where: str, field: str, path: str, width, height) -> None:
    if not os.path.isfile(path):
        report.add(where, field, f"file not found: {path}")
        return
    try:
        # Image.open reads only the header; no pixel is decoded.
        with Image.open(path) as img:
            size = img.size
    except OSError as exc:
        report.add(where, field, f"not a readable image: {path} ({exc})")
        return
    if width is not None and height is not None and size != (width, height):
        report.add(where, field, f"image {path} is {size[0]}x{size[1]} (WxH), record says {width}x{height}")


def _check_segmentation(report: _Report, where: str, field: str, seg, height, width) -> None:
    if seg is None or height is None or width is None:
        return
    try:
        segmentation_to_rle(seg, height, width)
    except ValueError as exc:
        report.add(where, field, str(exc))


def _check_box(report: _Report, where: str, field: str, box) -> None:
    if box is None:
        return
    if not (isinstance(box, list) and len(box) == 4 and all(_is_num(v) for v in box)):
        report.add(where, field, f"must be [x, y, w, h] numbers or null, got {box!r}")
    elif box[2] < 0 or box[3] < 0:
        report.add(where, field, f"negative width/height in {box!r}")


def _check_area(report: _Report, where: str, field: str, area) -> None:
    if area is not None and (not _is_num(area) or area < 0):
        report.add(where, field, f"must be a non-negative number or null, got {area!r}")


def _check_common_ann(report: _Report, ann: dict, where: str, categories: set) -> None:
    cid = ann.get("category_id")
    if "category_id" not in ann:
        report.add(where, "category_id", "required field is missing")
    elif not _is_int(cid):
        report.add(where, "category_id", f"must be an integer, got {_type_name(cid)}")
    elif cid not in categories:
        report.add(where, "category_id", f"unknown category id {cid}")
    crowd = ann.get("iscrowd")
    if "iscrowd" not in ann:
        report.add(where, "iscrowd", "required field is missing")
    elif not _is_int(crowd) or crowd not in (0, 1):
        report.add(where, "iscrowd", f"must be 0 or 1, got {crowd!r}")


def check_ytvis(ann_file: str, image_root: str) -> list[Problem]:
    """Every problem of a YouTube-VIS / OVIS annotation file and its frames under `image_root`.

    Checks field presence and types, unique ids, known video / category ids, per-frame lists as long as
    the video, RLE sizes equal to the video size, and that every frame exists with the declared size.
    """
    report = _Report(os.path.abspath(ann_file))
    data = _load(report, report.file)
    if data is not None:
        _ytvis_problems(report, data, image_root)
    return report.problems


def _ytvis_problems(report: _Report, data: dict, image_root: str) -> None:
    videos = _top_list(report, data, "videos")
    anns = _top_list(report, data, "annotations", optional=True)
    categories = _check_categories(report, _top_list(report, data, "categories"))

    video_shape: dict[int, tuple] = {}
    seen_videos: set = set()
    for i, video in enumerate(videos):
        where, vid = _record_id(report, video, i, "video", seen_videos, "videos")
        if where is None:
            continue
        width = _positive_int(report, video, where, "width")
        height = _positive_int(report, video, where, "height")
        names = video.get("file_names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            report.add(where, "file_names", "must be a non-empty list of strings")
            names = None
        length = video.get("length")
        if "length" not in video:
            report.add(where, "length", "required field is missing")
        elif not _is_int(length) or length <= 0:
            report.add(where, "length", f"must be a positive integer, got {length!r}")
        elif names is not None and length != len(names):
            report.add(where, "length", f"is {length} but file_names has {len(names)} entries")
        if names is not None:
            for t, name in enumerate(names):
                _check_image(report, where, f"file_names[{t}]", os.path.join(image_root, name), width, height)
        if vid is not None and vid not in video_shape:
            video_shape[vid] = (len(names) if names is not None else None, height, width)

    seen_anns: set = set()
    for i, ann in enumerate(anns):
        where, _ = _record_id(report, ann, i, "annotation", seen_anns, "annotations")
        if where is None:
            continue
        vid = ann.get("video_id")
        shape = (None, None, None)
        if "video_id" not in ann:
            report.add(where, "video_id", "required field is missing")
        elif not _is_int(vid):
            report.add(where, "video_id", f"must be an integer, got {_type_name(vid)}")
        elif vid not in video_shape:
            report.add(where, "video_id", f"unknown video id {vid}")
        else:
            shape = video_shape[vid]
        length, height, width = shape
        _check_common_ann(report, ann, where, categories)
        for key, value in (("width", width), ("height", height), ("length", length)):
            if key in ann and value is not None and ann[key] != value:
                report.add(where, key, f"is {ann[key]!r} but video {vid} has {value}")
        checkers = {"segmentations": lambda f, v: _check_segmentation(report, where, f, v, height, width),
                    "bboxes": lambda f, v: _check_box(report, where, f, v),
                    "areas": lambda f, v: _check_area(report, where, f, v)}
        for key, check in checkers.items():
            entries = ann.get(key)
            if key not in ann:
                report.add(where, key, "required field is missing")
                continue
            if not isinstance(entries, list):
                report.add(where, key, f"must be a list (one entry per frame), got {_type_name(entries)}")
                continue
            if length is not None and len(entries) != length:
                report.add(where, key, f"has {len(entries)} entries, video {vid} has {length} frames")
            for t, entry in enumerate(entries):
                check(f"{key}[{t}]", entry)


def check_coco(ann_file: str, image_root: str) -> list[Problem]:
    """Every problem of a COCO instance annotation file and its images under `image_root`.

    Checks field presence and types, unique ids, known image / category ids, RLE sizes equal to the image
    size, polygons well formed, and that every image exists with the declared size.
    """
    report = _Report(os.path.abspath(ann_file))
    data = _load(report, report.file)
    if data is not None:
        _coco_problems(report, data, image_root)
    return report.problems


def _coco_problems(report: _Report, data: dict, image_root: str) -> None:
    images = _top_list(report, data, "images")
    anns = _top_list(report, data, "annotations")
    categories = _check_categories(report, _top_list(report, data, "categories"))

    image_shape: dict[int, tuple] = {}
    seen_images: set = set()
    for i, image in enumerate(images):
        where, iid = _record_id(report, image, i, "image", seen_images, "images")
        if where is None:
            continue
        width = _positive_int(report, image, where, "width")
        height = _positive_int(report, image, where, "height")
        name = image.get("file_name")
        if not isinstance(name, str) or not name:
            report.add(where, "file_name", f"must be a non-empty string, got {name!r}")
        else:
            _check_image(report, where, "file_name", os.path.join(image_root, name), width, height)
        if iid is not None and iid not in image_shape:
            image_shape[iid] = (height, width)

    seen_anns: set = set()
    for i, ann in enumerate(anns):
        where, _ = _record_id(report, ann, i, "annotation", seen_anns, "annotations")
        if where is None:
            continue
        iid = ann.get("image_id")
        height = width = None
        if "image_id" not in ann:
            report.add(where, "image_id", "required field is missing")
        elif not _is_int(iid):
            report.add(where, "image_id", f"must be an integer, got {_type_name(iid)}")
        elif iid not in image_shape:
            report.add(where, "image_id", f"unknown image id {iid}")
        else:
            height, width = image_shape[iid]
        _check_common_ann(report, ann, where, categories)
        for key in ("segmentation", "bbox", "area"):
            if ann.get(key) is None:
                report.add(where, key, "required field is missing or null")
        _check_segmentation(report, where, "segmentation", ann.get("segmentation"), height, width)
        _check_box(report, where, "bbox", ann.get("bbox"))
        _check_area(report, where, "area", ann.get("area"))


def _format_of(data) -> str | None:
    if isinstance(data, dict) and "videos" in data:
        return "ytvis"
    if isinstance(data, dict) and "images" in data:
        return "coco"
    return None


def detect_format(ann_file: str) -> str:
    """'ytvis' when the file has a `videos` key, 'coco' when it has `images`; DatasetError otherwise."""
    fmt = _format_of(load_json(ann_file))
    if fmt is None:
        raise DatasetError(f"{ann_file}: neither a YouTube-VIS file (no 'videos') nor a COCO file (no 'images')")
    return fmt


def check_dataset(ann_file: str, image_root: str, fmt: str | None = None) -> tuple[list[Problem], str]:
    """Check a file in the given format ('ytvis' or 'coco'; detected from its keys when None).

    Returns (problems, summary line); the file is parsed once.
    """
    if fmt not in (None, "ytvis", "coco"):
        raise ValueError(f"format must be 'ytvis' or 'coco', got {fmt!r}")
    report = _Report(os.path.abspath(ann_file))
    data = _load(report, report.file)
    if data is not None:
        fmt = fmt or _format_of(data)
        if fmt is None:
            report.add("top level", "format", "neither a YouTube-VIS file (no 'videos') nor a COCO file "
                                              "(no 'images'); pass --format")
        else:
            (_ytvis_problems if fmt == "ytvis" else _coco_problems)(report, data, image_root)
    problems = report.problems
    if problems:
        return problems, f"{ann_file}: {len(problems)} problem{'s' if len(problems) != 1 else ''}"
    anns = data.get("annotations") or []
    if fmt == "ytvis":
        frames = sum(len(v["file_names"]) for v in data["videos"])
        counts = f"{len(data['videos'])} videos, {frames} frames"
    else:
        counts = f"{len(data['images'])} images"
    return problems, (f"{ann_file}: OK ({fmt}): {counts}, {len(anns)} annotations, "
                      f"{len(data['categories'])} categories")
