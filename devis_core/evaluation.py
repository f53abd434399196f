"""YouTube-VIS / OVIS video AP and AR: pycocotools' COCOeval with a video ("spatio-temporal") mask IoU.

The numbers are those of the official YouTube-VIS API (youtubevos/cocoapi ``ytvoseval.py``, also used
for OVIS): an "image" of COCOeval is a video, a mask is a list of per-frame RLEs (``None`` where the
object is absent), and the IoU of a prediction with a ground truth is

    IoU = sum_t |d_t & g_t|  /  sum_t |d_t | g_t|

over the frames where at least one of the two is present. Matching, accumulation and the summary are
pycocotools' own ``COCOeval.evaluateImg / accumulate / summarize``; only the data preparation, the IoU
and the area ranges (128^2 / 256^2 instead of COCO's 32^2 / 96^2) differ.

Use it in three ways::

    metrics = evaluate_files("valid.json", "results.json")        # one call
    ev = VideoInstanceEvaluator(load_ground_truth("valid.json"))   # from a training loop
    ev.reset(); ev.process(results_of_one_video); metrics = ev.evaluate()
    python -m devis_core.evaluation --gt valid.json --results results.json --out metrics.json
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import numbers
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.cocoeval import COCOeval
from devis_core.fileio import atomic_write_text

__all__ = [
    "STAT_NAMES",
    "AREA_RANGES",
    "EvaluationError",
    "VideoInfo",
    "Track",
    "GroundTruth",
    "frame_areas",
    "average_area",
    "video_iou",
    "load_ground_truth",
    "check_results",
    "evaluate_tracks",
    "VideoInstanceEvaluator",
    "evaluate_files",
    "format_metrics",
    "write_metrics",
    "build_evaluator",
    "main",
]

# Order and names of COCOeval's twelve summary numbers (values in [0, 1], -1 for a mean over nothing).
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# YouTube-VIS area ranges on a track's average per-frame area; 1e5**2 is the official "infinity".
AREA_RANGES = ((0.0, 1e5 ** 2), (0.0, 128.0 ** 2), (128.0 ** 2, 256.0 ** 2), (256.0 ** 2, 1e5 ** 2))
AREA_LABELS = ("all", "small", "medium", "large")
MAX_DETS = (1, 10, 100)


class EvaluationError(ValueError):
    """A ground-truth or results file (or in-memory results) that does not fit the YouTube-VIS format."""


@dataclass(frozen=True)
class VideoInfo:
    """A ground-truth video: frames are ``height`` x ``width`` pixels, ``length`` of them."""

    id: int
    height: int
    width: int
    length: int


@dataclass
class Track:
    """One ground-truth instance or one prediction over a whole video.

    rles: list of ``length`` per-frame masks, each a compressed RLE dict ``{"size": [H, W], "counts":
    str | bytes}`` or None where the object is absent.
    areas: (length,) float64 mask area per frame (0 where absent); filled by ``frame_areas`` when None.
    avg_area: the value compared with the area ranges (official rule: mean of the non-zero areas).
    """

    id: int
    video_id: int
    category_id: int
    rles: list
    score: float = 1.0
    iscrowd: int = 0
    areas: np.ndarray | None = None
    avg_area: float | None = None


@dataclass
class GroundTruth:
    """A parsed ground-truth file: videos by id, category records, one Track per annotation."""

    source: str
    videos: dict[int, VideoInfo]
    categories: list[dict]
    tracks: list[Track] = field(default_factory=list)

    @property
    def category_ids(self) -> list[int]:
        """Category ids in file order."""
        return [c["id"] for c in self.categories]


# ----------------------------------------------------------------------------------------------------
# Mask arithmetic (pure functions on RLE lists)

def frame_areas(rles: Sequence) -> np.ndarray:
    """Per-frame mask areas of one track.

    rles: T compressed RLE dicts or None. Returns (T,) float64, 0 where the frame is None.
    """
    areas = np.zeros(len(rles), dtype=np.float64)
    present = [t for t, r in enumerate(rles) if r is not None]
    if present:
        areas[present] = mask_utils.area([rles[t] for t in present])
    return areas


def average_area(areas: Iterable) -> float:
    """The area a track is binned by: mean of its entries that are neither None nor 0 (0 if none).

    Zero entries are skipped as the official ``[a for a in areas if a]`` does; the mean goes through
    ``np.array(...).mean()`` like the official code so the binning is bit-identical.
    """
    kept = [a for a in areas if a]
    return float(np.array(kept).mean()) if kept else 0.0


def video_iou(det_rles: Sequence[Sequence], gt_rles: Sequence[Sequence],
              det_areas: np.ndarray, gt_areas: np.ndarray) -> np.ndarray:
    """Video IoU of every prediction with every ground truth, without decoding any mask.

    det_rles: D tracks, each T per-frame RLE dicts or None; gt_rles: G tracks likewise.
    det_areas: (D, T), gt_areas: (G, T) per-frame areas (0 where None).
    Returns (D, G) float64: sum_t |d_t & g_t| / sum_t |d_t | g_t| (0 where the union is empty).

    pycocotools' C ``iou`` gives, per frame, all D x G ratios i/u in one call; since u = a_d + a_g - i,
    the integer intersection is recovered exactly as round(iou * (a_d + a_g) / (1 + iou)). With integer
    intersections the video union is sum_t (a_d + a_g) - sum_t i, so both sums stay exact integers and
    the ratio equals the official one bit for bit.
    """
    num_d, num_g = len(det_rles), len(gt_rles)
    inter = np.zeros((num_d, num_g), dtype=np.float64)
    if num_d == 0 or num_g == 0:
        return inter
    for t in range(det_areas.shape[1]):
        d_idx = [i for i in range(num_d) if det_rles[i][t] is not None]
        g_idx = [j for j in range(num_g) if gt_rles[j][t] is not None]
        if not d_idx or not g_idx:
            continue
        ratio = np.asarray(mask_utils.iou([det_rles[i][t] for i in d_idx],
                                          [gt_rles[j][t] for j in g_idx], [0] * len(g_idx)),
                           dtype=np.float64).reshape(len(d_idx), len(g_idx))
        if (ratio < 0).any():
            # pycocotools returns -1 for masks of different sizes; inputs are checked, so this is a bug.
            raise EvaluationError(f"frame {t}: RLE sizes of a prediction and a ground truth differ")
        both = det_areas[d_idx, t][:, None] + gt_areas[g_idx, t][None, :]
        inter[np.ix_(d_idx, g_idx)] += np.rint(ratio * both / (1.0 + ratio))
    union = det_areas.sum(axis=1)[:, None] + gt_areas.sum(axis=1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


# ----------------------------------------------------------------------------------------------------
# Reading and checking input

def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _load_json(path: str, what: str):
    if not os.path.isfile(path):
        raise EvaluationError(f"{path}: {what} file not found")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise EvaluationError(f"{path}: {what} file is not valid JSON: {exc}") from exc


def _gt_segmentation(seg, video: VideoInfo, where: str):
    """One ground-truth frame as a compressed RLE dict (None if absent); polygons are rasterised."""
    if not seg:  # None, and also [] / {} which the official ``if a:`` treats as absent
        return None
    h, w = video.height, video.width
    if isinstance(seg, list):
        if not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg):
            raise EvaluationError(f"{where}: expected a polygon list [[x0, y0, x1, y1, ...], ...] "
                                  "with at least 3 points each, an RLE dict or null")
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        raise EvaluationError(f"{where}: expected an RLE dict with 'size' and 'counts', a polygon list or null")
    if list(seg["size"]) != [h, w]:
        raise EvaluationError(f"{where}: RLE size {seg['size']} differs from the video's [{h}, {w}]")
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, h, w)
    if not isinstance(seg["counts"], (str, bytes)):
        raise EvaluationError(f"{where}: RLE 'counts' must be a string or a list of run lengths")
    return seg


def load_ground_truth(source: str | dict, name: str | None = None) -> GroundTruth:
    """Parse and check a YouTube-VIS / OVIS ground-truth file (path) or its already-loaded dict.

    Every annotation must name a known video and category and hold ``length`` segmentations.
    Missing ``areas`` are computed from the masks (the official API needs them in the file).
    """
    src = name or (source if isinstance(source, str) else "<ground truth>")
    data = _load_json(source, "ground-truth") if isinstance(source, str) else source
    if not isinstance(data, dict):
        raise EvaluationError(f"{src}: expected a JSON object with 'videos', 'categories', 'annotations'")
    for key in ("videos", "categories", "annotations"):
        if not isinstance(data.get(key), list):
            raise EvaluationError(f"{src}: key '{key}' must be a list")
    videos: dict[int, VideoInfo] = {}
    for i, v in enumerate(data["videos"]):
        for key in ("id", "height", "width", "length"):
            if not isinstance(v, dict) or not _is_int(v.get(key)):
                raise EvaluationError(f"{src}: videos[{i}] needs an integer '{key}'")
        if v["id"] in videos:
            raise EvaluationError(f"{src}: videos[{i}]: video id {v['id']} appears twice")
        videos[v["id"]] = VideoInfo(v["id"], v["height"], v["width"], v["length"])
    categories = []
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not _is_int(c.get("id")):
            raise EvaluationError(f"{src}: categories[{i}] needs an integer 'id'")
        if any(c["id"] == o["id"] for o in categories):
            raise EvaluationError(f"{src}: categories[{i}]: category id {c['id']} appears twice")
        categories.append({"id": c["id"], "name": str(c.get("name", c["id"]))})
    cat_ids = {c["id"] for c in categories}
    gt = GroundTruth(src, videos, categories)
    seen_ids = set()
    for i, a in enumerate(data["annotations"]):
        where = f"{src}: annotations[{i}]"
        for key in ("id", "video_id", "category_id"):
            if not isinstance(a, dict) or not _is_int(a.get(key)):
                raise EvaluationError(f"{where} needs an integer '{key}'")
        where = f"{where} (id {a['id']}, video {a['video_id']})"
        if a["id"] in seen_ids:
            raise EvaluationError(f"{where}: annotation id appears twice")
        seen_ids.add(a["id"])
        video = videos.get(a["video_id"])
        if video is None:
            raise EvaluationError(f"{where}: video_id {a['video_id']} is not in 'videos'")
        if a["category_id"] not in cat_ids:
            raise EvaluationError(f"{where}: category_id {a['category_id']} is not in 'categories'")
        segs = a.get("segmentations")
        if not isinstance(segs, list) or len(segs) != video.length:
            got = len(segs) if isinstance(segs, list) else type(segs).__name__
            raise EvaluationError(f"{where}: 'segmentations' must be a list of {video.length} entries "
                                  f"(the video's length), got {got}")
        rles = [_gt_segmentation(s, video, f"{where}: segmentations[{t}]") for t, s in enumerate(segs)]
        areas = frame_areas(rles)
        given = a.get("areas")
        if given is None:
            avg = average_area(areas)
        else:
            if not isinstance(given, list) or len(given) != video.length or not all(
                    x is None or (isinstance(x, numbers.Real) and not isinstance(x, bool)) for x in given):
                raise EvaluationError(f"{where}: 'areas' must be a list of {video.length} numbers or nulls")
            avg = average_area(given)  # the official API bins ground truth by the file's areas
        gt.tracks.append(Track(a["id"], a["video_id"], a["category_id"], rles, 1.0,
                               int(bool(a.get("iscrowd", 0))), areas, avg))
    return gt


def check_results(results, gt: GroundTruth, source: str = "<results>", start_index: int = 0) -> list[Track]:
    """Check YouTube-VIS result entries against the ground truth and turn them into Tracks.

    results: list of ``{video_id, category_id, score, segmentations: [RLE | None] x video length}``.
    Errors name ``source``, the entry's index (counting from ``start_index``), its video id and field.
    Track ids are ``index + 1`` like the official ``loadRes`` (0 would read as "unmatched").
    """
    if not isinstance(results, list):
        raise EvaluationError(f"{source}: expected a JSON list of result entries, got {type(results).__name__}")
    cat_ids = set(gt.category_ids)
    tracks = []
    for k, r in enumerate(results):
        index = start_index + k
        where = f"{source}: entry {index}"
        if not isinstance(r, dict):
            raise EvaluationError(f"{where}: expected an object, got {type(r).__name__}")
        for key in ("video_id", "category_id", "score", "segmentations"):
            if key not in r:
                raise EvaluationError(f"{where}: missing field '{key}'")
        vid = r["video_id"]
        video = gt.videos.get(vid) if _is_int(vid) else None
        if video is None:
            raise EvaluationError(f"{where}: video_id {vid!r} is not a video of {gt.source}")
        where = f"{where} (video_id {vid})"
        if not _is_int(r["category_id"]) or r["category_id"] not in cat_ids:
            raise EvaluationError(f"{where}: category_id {r['category_id']!r} is not a category of {gt.source} "
                                  f"(known: {sorted(cat_ids)})")
        score = r["score"]
        if not isinstance(score, numbers.Real) or isinstance(score, bool) or not math.isfinite(score):
            raise EvaluationError(f"{where}: field 'score' must be a finite number, got {score!r}")
        segs = r["segmentations"]
        if not isinstance(segs, list) or len(segs) != video.length:
            got = f"{len(segs)} entries" if isinstance(segs, list) else type(segs).__name__
            raise EvaluationError(f"{where}: field 'segmentations' must be a list of {video.length} entries "
                                  f"(one per frame of the video), got {got}")
        size = [video.height, video.width]
        for t, s in enumerate(segs):
            if s is None:
                continue
            if not isinstance(s, dict) or not isinstance(s.get("counts"), (str, bytes)):
                raise EvaluationError(f"{where}: segmentations[{t}] must be null or a compressed RLE "
                                      "{'size': [H, W], 'counts': str}")
            if not isinstance(s.get("size"), (list, tuple)) or list(s["size"]) != size:
                raise EvaluationError(f"{where}: segmentations[{t}] has RLE size {s.get('size')!r}, "
                                      f"the video is {size}")
        tracks.append(Track(index + 1, vid, r["category_id"], segs, float(score)))
    return tracks


# ----------------------------------------------------------------------------------------------------
# COCOeval on videos

class _VideoCOCOeval(COCOeval):
    """COCOeval whose images are videos: only data preparation and the IoU are replaced."""

    def __init__(self, gt: GroundTruth, detections: list[Track]):
        super().__init__(None, None, "segm")
        self._gt = gt
        self._detections = detections
        p = self.params
        p.imgIds = sorted(gt.videos)
        p.catIds = sorted(gt.category_ids)
        p.areaRng = [list(r) for r in AREA_RANGES]
        p.areaRngLbl = list(AREA_LABELS)
        p.maxDets = list(MAX_DETS)

    def _prepare(self):
        self._gts = defaultdict(list)
        self._dts = defaultdict(list)
        for g in self._gt.tracks:
            self._gts[g.video_id, g.category_id].append(
                {"id": g.id, "area": g.avg_area, "iscrowd": g.iscrowd, "ignore": g.iscrowd, "track": g})
        groups = defaultdict(list)
        for d in self._detections:
            groups[d.video_id, d.category_id].append(d)
        max_det = self.params.maxDets[-1]
        for key, dets in groups.items():
            # Stable sort then cut, as the official computeIoU; later ones are never looked at, so
            # their areas are not computed.
            order = np.argsort([-d.score for d in dets], kind="mergesort")[:max_det]
            for i in order:
                d = dets[i]
                if d.areas is None:
                    d.areas = frame_areas(d.rles)
                    d.avg_area = average_area(d.areas)
                self._dts[key].append({"id": d.id, "area": d.avg_area, "iscrowd": 0, "ignore": 0,
                                       "score": d.score, "track": d})

    def computeIoU(self, imgId, catId):  # noqa: N802 (COCOeval's name)
        gts, dts = self._gts[imgId, catId], self._dts[imgId, catId]
        if not gts and not dts:
            return []
        if not gts or not dts:
            return np.zeros((len(dts), len(gts)))
        return video_iou([d["track"].rles for d in dts], [g["track"].rles for g in gts],
                         np.stack([d["track"].areas for d in dts]), np.stack([g["track"].areas for g in gts]))


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def evaluate_tracks(gt: GroundTruth, detections: list[Track]) -> dict:
    """YouTube-VIS metrics of prediction Tracks against a GroundTruth.

    Returns {"AP", "AP50", ..., "ARl": float in [0, 1] or -1, "per_category": [{"category_id", "name",
    "AP", "AR100"}], "num_videos", "num_predictions"}; per-category values use area "all", 100 dets.
    """
    coco_eval = _VideoCOCOeval(gt, detections)
    # COCOeval reports progress with print(); the caller decides what to show.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    metrics = {name: float(v) for name, v in zip(STAT_NAMES, coco_eval.stats)}
    precision, recall = coco_eval.eval["precision"], coco_eval.eval["recall"]
    cat_ids = coco_eval.params.catIds
    names = {c["id"]: c["name"] for c in gt.categories}
    metrics["per_category"] = [
        {"category_id": int(cid), "name": names[cid],
         "AP": _mean_valid(precision[:, :, k, 0, -1]), "AR100": _mean_valid(recall[:, k, 0, -1])}
        for k, cid in enumerate(cat_ids)]
    metrics["num_videos"] = len(gt.videos)
    metrics["num_predictions"] = len(detections)
    return metrics


class VideoInstanceEvaluator:
    """Evaluator with the reset / process / evaluate interface, for training and inference loops.

    ``process`` takes result entries (any number of videos at a time, e.g. the tracker's output for
    one video) and checks them at once, so a bad entry fails where it is produced. ``evaluate`` scores
    everything processed since ``reset`` against all videos of the ground truth.
    """

    def __init__(self, ground_truth: GroundTruth):
        self.gt = ground_truth
        self.reset()

    def reset(self) -> None:
        self._tracks: list[Track] = []
        self._count = 0

    def process(self, results: list[dict], source: str = "<results>") -> None:
        """Add result entries ``{video_id, category_id, score, segmentations}`` (see ``check_results``)."""
        self._tracks.extend(check_results(results, self.gt, source, start_index=self._count))
        self._count += len(results)

    def evaluate(self) -> dict:
        """Metrics of everything processed so far (see ``evaluate_tracks``)."""
        return evaluate_tracks(self.gt, self._tracks)


def evaluate_files(gt_json: str, results_json: str) -> dict:
    """One call: load and check both files, return the metrics dict of ``evaluate_tracks``."""
    gt = load_ground_truth(gt_json)
    evaluator = VideoInstanceEvaluator(gt)
    evaluator.process(_load_json(results_json, "results"), source=results_json)
    return evaluator.evaluate()


# ----------------------------------------------------------------------------------------------------
# Reporting

def format_metrics(metrics: dict) -> str:
    """The official twelve-line summary, then per-category AP, as text."""
    rows = [("AP", 1, None, "all", 100), ("AP50", 1, .5, "all", 100), ("AP75", 1, .75, "all", 100),
            ("APs", 1, None, "small", 100), ("APm", 1, None, "medium", 100), ("APl", 1, None, "large", 100),
            ("AR1", 0, None, "all", 1), ("AR10", 0, None, "all", 10), ("AR100", 0, None, "all", 100),
            ("ARs", 0, None, "small", 100), ("ARm", 0, None, "medium", 100), ("ARl", 0, None, "large", 100)]
    lines = []
    for name, ap, thr, area, dets in rows:
        title = "Average Precision  (AP)" if ap else "Average Recall     (AR)"
        iou = "0.50:0.95" if thr is None else f"{thr:0.2f}"
        lines.append(f" {title} @[ IoU={iou:<9} | area={area:>6s} | maxDets={dets:>3d} ] = {metrics[name]:0.3f}")
    if metrics.get("per_category"):
        lines.append("")
        lines.append(f" {'category':<24} {'id':>4} {'AP':>7} {'AR100':>7}")
        for c in metrics["per_category"]:
            lines.append(f" {c['name'][:24]:<24} {c['category_id']:>4} {c['AP']:>7.3f} {c['AR100']:>7.3f}")
    return "\n".join(lines)


def write_metrics(path: str, metrics: dict) -> None:
    """Write the metrics as JSON atomically (temporary file in the same folder, then rename)."""
    atomic_write_text(path, json.dumps(metrics, indent=1) + "\n")


def build_evaluator(cfg, annotation_file: str | None = None) -> VideoInstanceEvaluator:
    """Evaluator for ``cfg.DATASETS.VAL_DATASET`` (or for ``annotation_file`` when given).

    The annotation file of a dataset name comes from the dataset registry (spec §8.2). The public
    validation splits ship without ground truth (scored on CodaLab): pass a file of one's own there.
    """
    if annotation_file is None:
        from devis_core.data.registry import get_dataset_spec

        name = cfg.DATASETS.VAL_DATASET
        try:
            spec = get_dataset_spec(name)
        except KeyError as exc:
            raise EvaluationError(f"DATASETS.VAL_DATASET {name!r}: {exc.args[0] if exc.args else exc}") from exc
        if spec.kind != "vis":
            raise EvaluationError(f"DATASETS.VAL_DATASET {name!r} is a {spec.kind} dataset, expected a video "
                                  "(YouTube-VIS / OVIS) dataset")
        annotation_file = os.path.join(cfg.DATASETS.DATA_PATH, spec.ann_file)
    return VideoInstanceEvaluator(load_ground_truth(annotation_file))


def main(argv: list[str] | None = None) -> int:
    """Command line: print the YouTube-VIS table for --gt / --results, optionally write --out JSON."""
    parser = argparse.ArgumentParser(prog="python -m devis_core.evaluation", description=__doc__.splitlines()[0])
    parser.add_argument("--gt", required=True, help="YouTube-VIS / OVIS ground-truth JSON")
    parser.add_argument("--results", required=True, help="results JSON (list of video predictions)")
    parser.add_argument("--out", help="write the metrics here as JSON")
    args = parser.parse_args(argv)
    try:
        metrics = evaluate_files(args.gt, args.results)
    except EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_metrics(metrics))
    if args.out:
        write_metrics(args.out, metrics)
        print(f"\nmetrics written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
