"""Seeded synthetic YouTube-VIS and COCO datasets (moving textured shapes) in the official folder layouts."""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass, field

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image
from devis_core.fileio import atomic_write_bytes

__all__ = [
    "SHAPES",
    "MIN_VISIBLE_PIXELS",
    "ObjectTrack",
    "Scene",
    "synthetic_categories",
    "shape_mask",
    "sample_scene",
    "render_scene",
    "plan_split",
    "scene_annotations",
    "make_synthetic_vis",
    "make_synthetic_coco",
]

# Bump when the drawing or the file layout changes, so existing datasets regenerate instead of being reused.
GENERATOR_VERSION = 1
JPEG_QUALITY = 92
MANIFEST_NAME = "synthetic_manifest.json"
COMPLETE_MARKER = ".complete"

SHAPES = ("disc", "square", "triangle", "star", "ring", "cross", "ellipse", "hexagon")
# Saturated, well separated hues: the background is kept greyish so colour alone nearly separates classes.
_COLOURS = np.array([
    [230, 40, 40], [40, 200, 60], [50, 90, 240], [240, 220, 40],
    [220, 50, 220], [40, 220, 230], [250, 140, 20], [140, 60, 200],
], dtype=np.float32)
_TEXTURES = ("rings", "checker", "hstripes", "rays", "spokes", "diagonal", "dots", "grid")
# Objects with fewer visible pixels get a null segmentation (the official pipeline treats <= 2 px as absent).
MIN_VISIBLE_PIXELS = 12


def synthetic_categories(num_categories: int) -> list[dict]:
    """COCO/YT-VIS category records of the synthetic data: ids 1..K named after their shape."""
    if not 1 <= num_categories <= len(SHAPES):
        raise ValueError(f"num_categories must be in 1..{len(SHAPES)} (one per shape), got {num_categories}")
    return [{"id": i + 1, "name": SHAPES[i], "supercategory": "shape"} for i in range(num_categories)]


def _regular_polygon(u: np.ndarray, v: np.ndarray, sides: int, phase: float) -> np.ndarray:
    """Inside test of a regular polygon with circumradius 1: every edge's half-plane at the apothem."""
    apothem = np.cos(np.pi / sides)
    inside = np.ones(u.shape, dtype=bool)
    for k in range(sides):
        a = phase + 2 * np.pi * k / sides
        inside &= u * np.cos(a) + v * np.sin(a) <= apothem
    return inside


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Rasterise a unit-size shape.

    u, v: (...) object-frame coordinates (pixel offset from the centre, rotated, divided by the radius).
    Returns (...) bool, True inside. Every shape fits in the unit disc.
    """
    r2 = u * u + v * v
    if shape == "disc":
        return r2 <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if shape == "triangle":
        return _regular_polygon(u, v, 3, np.pi / 2)
    if shape == "star":
        theta = np.arctan2(v, u)
        # Five sharp spikes: radius swings between 0.42 and 1.0.
        return np.sqrt(r2) <= 0.42 + 0.58 * ((1.0 + np.cos(5 * theta)) / 2) ** 3
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.55 ** 2)
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    if shape == "ellipse":
        return u * u + (v / 0.5) ** 2 <= 1.0
    if shape == "hexagon":
        return _regular_polygon(u, v, 6, 0.0)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _texture(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Texture intensity in [0, 1] in object coordinates, so it moves, turns and scales with the object."""
    if kind == "rings":
        return 0.5 + 0.5 * np.cos(np.sqrt(u * u + v * v) * 6 * np.pi)
    if kind == "checker":
        return ((np.floor(u * 3) + np.floor(v * 3)) % 2).astype(np.float32)
    if kind == "hstripes":
        return 0.5 + 0.5 * np.sign(np.sin(v * 9))
    if kind == "rays":
        return 0.5 + 0.5 * np.cos(np.arctan2(v, u) * 10)
    if kind == "spokes":
        return 0.5 + 0.5 * np.sign(np.cos(np.arctan2(v, u) * 4))
    if kind == "diagonal":
        return 0.5 + 0.5 * np.sign(np.sin((u + v) * 7))
    if kind == "dots":
        return ((np.sin(u * 12) * np.sin(v * 12)) > 0.3).astype(np.float32)
    if kind == "grid":
        return (((np.abs(np.sin(u * 8)) < 0.35) | (np.abs(np.sin(v * 8)) < 0.35))).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}")


@dataclass
class ObjectTrack:
    """One object's trajectory over a video.

    centers: (T, 2) x, y in pixels; radii: (T,) pixels; angles: (T,) radians.
    """

    category_id: int
    centers: np.ndarray
    radii: np.ndarray
    angles: np.ndarray


@dataclass
class Scene:
    """A whole video before rendering; `objects` are listed back to front (drawing order = depth)."""

    height: int
    width: int
    length: int
    bg_colours: np.ndarray          # (2, 3) RGB endpoints of the background palette
    bg_waves: np.ndarray            # (K, 4) fx, fy (cycles / px), phase, weight
    bg_velocity: np.ndarray         # (2,) px / frame pan of the background pattern
    bg_grain: np.ndarray            # (H, W) static sensor-like noise
    objects: list[ObjectTrack] = field(default_factory=list)


def _bounce(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflect free motion into [lo, hi] (a triangle wave), i.e. elastic bounces off the walls."""
    span = max(hi - lo, 1e-6)
    q = np.mod(p - lo, 2 * span)
    return lo + span - np.abs(q - span)


def _sample_track(rng: np.random.Generator, category_id: int, length: int, height: int, width: int,
                  cross_prob: float) -> ObjectTrack:
    t = np.arange(length, dtype=np.float64)
    s = t / max(length - 1, 1)
    r0 = rng.uniform(0.09, 0.2) * min(height, width)
    radii = r0 * np.exp(rng.uniform(-0.6, 0.6) * s)
    angles = rng.uniform(0, 2 * np.pi) + rng.uniform(-0.15, 0.15) * t
    r_max = float(radii.max())
    if length > 2 and rng.random() < cross_prob:
        # Enters through a random side, reaching a point inside at a random time; half of them are
        # time-reversed so they leave instead. Starts fully outside, so the first frames are null.
        side = rng.integers(4)
        inside = np.array([rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height])
        start = inside.copy()
        off = 1.15 * r_max
        if side == 0:
            start[0] = -off
        elif side == 1:
            start[0] = width + off
        elif side == 2:
            start[1] = -off
        else:
            start[1] = height + off
        t_in = rng.uniform(0.4, 0.8) * (length - 1)
        centers = start[None, :] + (inside - start)[None, :] * (t / t_in)[:, None]
        if rng.random() < 0.5:
            centers = centers[::-1].copy()
    else:
        start = np.array([rng.uniform(0, width), rng.uniform(0, height)])
        heading = rng.uniform(0, 2 * np.pi)
        speed = rng.uniform(0.005, 0.035) * max(height, width)
        free = start[None, :] + speed * t[:, None] * np.array([np.cos(heading), np.sin(heading)])[None, :]
        centers = np.stack([_bounce(free[:, 0], 0.0, float(width)),
                            _bounce(free[:, 1], 0.0, float(height))], axis=1)
    return ObjectTrack(category_id=category_id, centers=centers, radii=radii, angles=angles)


def sample_scene(rng: np.random.Generator, length: int, size: tuple[int, int], category_ids: list[int],
                 cross_prob: float = 0.35) -> Scene:
    """Draw a random video: a panning textured background and one track per entry of `category_ids`.

    size: (H, W). category_ids: the objects' categories, back to front. cross_prob: share of objects that
    enter or leave through a frame edge (only for videos of 3+ frames).
    """
    height, width = size
    base = rng.uniform(70, 170, size=3)
    bg_colours = np.stack([base, np.clip(base + rng.normal(0, 35, size=3), 30, 220)]).astype(np.float32)
    n_waves = 3
    direction = rng.uniform(0, 2 * np.pi, n_waves)
    period = rng.uniform(0.08, 0.4, n_waves) * max(height, width)
    bg_waves = np.stack([np.cos(direction) / period, np.sin(direction) / period,
                         rng.uniform(0, 2 * np.pi, n_waves), rng.uniform(0.5, 1.0, n_waves)], axis=1)
    bg_velocity = rng.uniform(-0.012, 0.012, 2) * max(height, width)
    bg_grain = rng.normal(0, 5, size=(height, width)).astype(np.float32)
    objects = [_sample_track(rng, int(c), length, height, width, cross_prob) for c in category_ids]
    return Scene(height, width, length, bg_colours, bg_waves, bg_velocity, bg_grain, objects)


def render_scene(scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw every frame of a scene.

    Returns frames (T, H, W, 3) uint8 RGB, visible (N, T, H, W) bool (what the viewer sees of object n:
    its shape minus every object drawn after it) and amodal (N, T, H, W) bool (the whole shape,
    clipped to the frame).
    """
    H, W, T, N = scene.height, scene.width, scene.length, len(scene.objects)
    ys = (np.arange(H, dtype=np.float32) + 0.5)[:, None]
    xs = (np.arange(W, dtype=np.float32) + 0.5)[None, :]
    frames = np.empty((T, H, W, 3), dtype=np.uint8)
    visible = np.zeros((N, T, H, W), dtype=bool)
    amodal = np.zeros((N, T, H, W), dtype=bool)
    weights = scene.bg_waves[:, 3].sum()
    for t in range(T):
        shift = scene.bg_velocity * t
        wave = np.zeros((H, W), dtype=np.float32)
        for fx, fy, phase, weight in scene.bg_waves:
            wave += weight * np.sin(2 * np.pi * (fx * (xs - shift[0]) + fy * (ys - shift[1])) + phase)
        mix = (wave / weights + 1.0) * 0.5
        img = scene.bg_colours[0] + (scene.bg_colours[1] - scene.bg_colours[0]) * mix[..., None]
        img += scene.bg_grain[..., None]
        owner = np.full((H, W), -1, dtype=np.int16)
        for n, obj in enumerate(scene.objects):
            cx, cy = obj.centers[t]
            r = float(obj.radii[t])
            x0, x1 = max(int(np.floor(cx - r)) - 1, 0), min(int(np.ceil(cx + r)) + 2, W)
            y0, y1 = max(int(np.floor(cy - r)) - 1, 0), min(int(np.ceil(cy + r)) + 2, H)
            if x0 >= x1 or y0 >= y1:
                continue
            dx, dy = xs[:, x0:x1] - cx, ys[y0:y1, :] - cy
            cos, sin = np.cos(obj.angles[t]), np.sin(obj.angles[t])
            u = (cos * dx + sin * dy) / r
            v = (-sin * dx + cos * dy) / r
            k = obj.category_id - 1
            inside = shape_mask(SHAPES[k], u, v)
            if not inside.any():
                continue
            shade = 0.5 + 0.5 * _texture(_TEXTURES[k], u, v)
            patch = img[y0:y1, x0:x1]
            patch[inside] = (_COLOURS[k][None, None, :] * shade[..., None])[inside]
            owner[y0:y1, x0:x1][inside] = n
            amodal[n, t, y0:y1, x0:x1] = inside
        for n in range(N):
            visible[n, t] = owner == n
        frames[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return frames, visible, amodal


# ---------------------------------------------------------------------------------------------- file I/O



def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _jpeg_bytes(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # Fixed quality and subsampling, no optimisation pass: the same pixels give the same bytes.
    Image.fromarray(frame).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    return buf.getvalue()


def _mask_record(mask: np.ndarray) -> tuple[dict, list[float], float]:
    """(H, W) bool -> (compressed RLE with str counts, [x, y, w, h], area in pixels as float)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    box = [float(v) for v in mask_utils.toBbox(rle)]
    rle = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return rle, box, float(mask.sum())


def _category_sequence(rng: np.random.Generator, num_categories: int, count: int) -> list[int]:
    """`count` category ids that visit every class equally often (shuffled rounds of 1..K)."""
    out: list[int] = []
    while len(out) < count:
        out.extend(int(c) + 1 for c in rng.permutation(num_categories))
    return out[:count]


def _check_pair(name: str, value, minimum: int, ordered: bool = True) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of integers, got {value!r}") from None
    if a < minimum or b < minimum or (ordered and a > b):
        order = " with min <= max" if ordered else ""
        raise ValueError(f"{name} must be integers >= {minimum}{order}, got {value!r}")
    return a, b


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _prepare_root(root: str, settings: dict, owned: list[str], outputs: list[str]) -> bool:
    """Decide between reuse and (re)generation; returns True when the dataset on disk is already complete.

    Only folders this generator created (a manifest is present) are ever deleted.
    """
    manifest_path = os.path.join(root, MANIFEST_NAME)
    marker = os.path.join(root, COMPLETE_MARKER)
    if os.path.isfile(manifest_path):
        with open(manifest_path, "r", encoding="utf-8") as fh:
            try:
                previous = json.load(fh)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{manifest_path}: corrupt manifest ({exc}); delete {root} to regenerate") from exc
        if previous == settings and os.path.isfile(marker) and all(os.path.exists(p) for p in outputs):
            return True
        if os.path.exists(marker):
            os.remove(marker)
        for sub in owned:
            if os.path.isdir(os.path.join(root, sub)):
                shutil.rmtree(os.path.join(root, sub))
    elif os.path.isdir(root) and os.listdir(root):
        raise FileExistsError(f"{root} exists, is not empty and has no {MANIFEST_NAME}: refusing to overwrite "
                              f"data this generator did not write (choose another name or data path)")
    atomic_write_bytes(manifest_path, _json_bytes(settings))
    return False


def _info(kind: str, settings: dict) -> dict:
    return {"description": f"DeVIS workbench synthetic {kind} dataset (devis_core.data.synthetic)",
            "version": str(GENERATOR_VERSION), "contributor": "devis_core", "settings": settings}


_SPLIT_STREAMS = {"train": 0, "valid": 1, "train2017": 100, "val2017": 101}


def plan_split(split: str, num_items: int, frames: tuple[int, int], size: tuple[int, int], num_categories: int,
               objects: tuple[int, int], seed: int) -> list[Scene]:
    """The scenes of one split, before rendering; what make_synthetic_vis / make_synthetic_coco draw.

    split: "train" / "valid" (videos) or "train2017" / "val2017" (single-frame images, frames=(1, 1)).
    Each split and each video has its own random stream, so splits never repeat each other.
    """
    if split not in _SPLIT_STREAMS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_STREAMS)}, got {split!r}")
    stream = _SPLIT_STREAMS[split]
    rng = np.random.default_rng([seed, stream])
    lengths = rng.integers(frames[0], frames[1] + 1, size=num_items)
    counts = rng.integers(objects[0], objects[1] + 1, size=num_items)
    cats = _category_sequence(rng, num_categories, int(counts.sum()))
    starts = np.concatenate([[0], np.cumsum(counts)])
    return [sample_scene(np.random.default_rng([seed, stream, i]), int(lengths[i]), size,
                         cats[starts[i]:starts[i + 1]]) for i in range(num_items)]


def scene_annotations(scene: Scene, visible: np.ndarray, video_id: int, first_id: int) -> list[dict]:
    """YouTube-VIS annotation records of a rendered scene.

    visible: (N, T, H, W) bool from render_scene. Frames with fewer than MIN_VISIBLE_PIXELS visible pixels
    (absent, covered or nearly so) get null segmentation, bbox and area, as in YouTube-VIS; objects never
    visible get no record. Ids are consecutive from first_id.
    """
    records = []
    length, height, width = scene.length, scene.height, scene.width
    for n, obj in enumerate(scene.objects):
        segs, boxes, areas = [], [], []
        for t in range(length):
            if visible[n, t].sum() < MIN_VISIBLE_PIXELS:
                segs.append(None)
                boxes.append(None)
                areas.append(None)
                continue
            rle, box, area = _mask_record(visible[n, t])
            segs.append(rle)
            boxes.append(box)
            areas.append(area)
        if all(s is None for s in segs):
            continue
        records.append({"id": first_id + len(records), "video_id": video_id, "category_id": obj.category_id,
                        "segmentations": segs, "bboxes": boxes, "areas": areas, "iscrowd": 0,
                        "width": width, "height": height, "length": length})
    return records


def _write_vis_split(root: str, split: str, num_videos: int, frames: tuple[int, int], size: tuple[int, int],
                     num_categories: int, objects: tuple[int, int], seed: int, settings: dict) -> None:
    height, width = size
    videos, annotations = [], []
    image_dir = os.path.join(root, split, "JPEGImages")
    for i, scene in enumerate(plan_split(split, num_videos, frames, size, num_categories, objects, seed)):
        video_id = i + 1
        name = f"{split}_{i:04d}"
        length = scene.length
        pixels, visible, _ = render_scene(scene)
        # YouTube-VIS names frames by their index in the 30 fps source, annotated every 5th frame.
        file_names = [f"{name}/{5 * t:05d}.jpg" for t in range(length)]
        for t in range(length):
            atomic_write_bytes(os.path.join(image_dir, file_names[t]), _jpeg_bytes(pixels[t]))
        videos.append({"id": video_id, "width": width, "height": height, "length": length,
                       "file_names": file_names, "name": name})
        annotations.extend(scene_annotations(scene, visible, video_id, len(annotations) + 1))
    data = {"info": _info("YouTube-VIS", settings), "licenses": [], "videos": videos,
            "annotations": annotations, "categories": synthetic_categories(num_categories)}
    atomic_write_bytes(os.path.join(root, split, "instances.json"), _json_bytes(data))


def make_synthetic_vis(data_path: str, name: str = "synthetic_vis", *, num_videos: tuple[int, int] = (24, 8),
                       frames: tuple[int, int] = (8, 16), size: tuple[int, int] = (240, 320),
                       num_categories: int = 6, objects: tuple[int, int] = (2, 4), seed: int = 0) -> dict:
    """Write a YouTube-VIS 2021-layout dataset of moving textured shapes under `data_path/name`.

    Layout: {train,valid}/JPEGImages/<video>/<frame>.jpg and {train,valid}/instances.json, ground truth in
    both splits. num_videos: (train, valid); frames: (min, max) video length; size: (H, W); objects:
    (min, max) per video; categories are ids 1..num_categories named after SHAPES. The same arguments give
    byte-identical files; re-running over a complete dataset with the same arguments does nothing.
    Returns the absolute paths: root, manifest, train_image_root, train_ann_file, valid_image_root,
    valid_ann_file.
    """
    num_videos = _check_pair("num_videos", num_videos, 0, ordered=False)
    frames = _check_pair("frames", frames, 1)
    size = _check_pair("size", size, 16, ordered=False)
    objects = _check_pair("objects", objects, 1)
    seed = _check_seed(seed)
    synthetic_categories(num_categories)
    root = os.path.abspath(os.path.join(data_path, name))
    paths = {"root": root, "manifest": os.path.join(root, MANIFEST_NAME)}
    for split in ("train", "valid"):
        paths[f"{split}_image_root"] = os.path.join(root, split, "JPEGImages")
        paths[f"{split}_ann_file"] = os.path.join(root, split, "instances.json")
    settings = {"kind": "vis", "version": GENERATOR_VERSION, "num_videos": list(num_videos),
                "frames": list(frames), "size": list(size), "num_categories": int(num_categories),
                "objects": list(objects), "seed": int(seed)}
    outputs = [paths["train_ann_file"], paths["valid_ann_file"]]
    if _prepare_root(root, settings, ["train", "valid"], outputs):
        return paths
    for code, split in enumerate(("train", "valid")):
        os.makedirs(paths[f"{split}_image_root"], exist_ok=True)
        _write_vis_split(root, split, num_videos[code], frames, size, int(num_categories), objects, int(seed),
                         settings)
    atomic_write_bytes(os.path.join(root, COMPLETE_MARKER), _json_bytes(settings))
    return paths


def _write_coco_split(root: str, split: str, num_images: int, size: tuple[int, int], num_categories: int,
                      objects: tuple[int, int], seed: int, settings: dict) -> None:
    height, width = size
    images, annotations = [], []
    for i, scene in enumerate(plan_split(split, num_images, (1, 1), size, num_categories, objects, seed)):
        image_id = i + 1
        pixels, visible, _ = render_scene(scene)
        file_name = f"{image_id:012d}.jpg"
        atomic_write_bytes(os.path.join(root, split, file_name), _jpeg_bytes(pixels[0]))
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for n, obj in enumerate(scene.objects):
            if visible[n, 0].sum() < MIN_VISIBLE_PIXELS:
                continue
            rle, box, area = _mask_record(visible[n, 0])
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": obj.category_id,
                                "segmentation": rle, "bbox": box, "area": area, "iscrowd": 0})
    data = {"info": _info("COCO", settings), "licenses": [], "images": images, "annotations": annotations,
            "categories": synthetic_categories(num_categories)}
    atomic_write_bytes(os.path.join(root, "annotations", f"instances_{split}.json"), _json_bytes(data))


def make_synthetic_coco(data_path: str, name: str = "synthetic_coco", *, num_images: tuple[int, int] = (64, 16),
                        size: tuple[int, int] = (240, 320), num_categories: int = 6,
                        objects: tuple[int, int] = (2, 5), seed: int = 0) -> dict:
    """Write a COCO-layout image dataset of textured shapes under `data_path/name`.

    Layout: {train2017,val2017}/<012d id>.jpg and annotations/instances_{train,val}2017.json (compressed RLE
    segmentation, bbox, area, iscrowd). Same categories as make_synthetic_vis. Returns the absolute paths:
    root, manifest, train_image_root, train_ann_file, val_image_root, val_ann_file.
    """
    num_images = _check_pair("num_images", num_images, 0, ordered=False)
    size = _check_pair("size", size, 16, ordered=False)
    objects = _check_pair("objects", objects, 1)
    seed = _check_seed(seed)
    synthetic_categories(num_categories)
    root = os.path.abspath(os.path.join(data_path, name))
    paths = {"root": root, "manifest": os.path.join(root, MANIFEST_NAME)}
    for split in ("train", "val"):
        paths[f"{split}_image_root"] = os.path.join(root, f"{split}2017")
        paths[f"{split}_ann_file"] = os.path.join(root, "annotations", f"instances_{split}2017.json")
    settings = {"kind": "coco", "version": GENERATOR_VERSION, "num_images": list(num_images), "size": list(size),
                "num_categories": int(num_categories), "objects": list(objects), "seed": int(seed)}
    outputs = [paths["train_ann_file"], paths["val_ann_file"]]
    if _prepare_root(root, settings, ["train2017", "val2017", "annotations"], outputs):
        return paths
    for code, split in enumerate(("train", "val")):
        os.makedirs(paths[f"{split}_image_root"], exist_ok=True)
        _write_coco_split(root, f"{split}2017", num_images[code], size, int(num_categories), objects, int(seed),
                          settings)
    atomic_write_bytes(os.path.join(root, COMPLETE_MARKER), _json_bytes(settings))
    return paths
