"""YouTube-VIS result files: merging per-video results and writing results.json + results.zip atomically."""
from __future__ import annotations

import json
import math
import os
import zipfile
from typing import Iterable, Sequence

from devis_core.fileio import atomic_write

RESULTS_NAME = "results.json"
ZIP_NAME = "results.zip"
ENTRY_KEYS = ("video_id", "score", "category_id", "segmentations")


def check_entry(entry: dict, where: str) -> None:
    """Raise ValueError naming ``where`` and the field when ``entry`` is not a YouTube-VIS result entry
    ``{video_id: int, score: finite float, category_id: int, segmentations: [RLE dict | None per frame]}``."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a dict with keys {list(ENTRY_KEYS)}, got {type(entry).__name__}")
    missing = [k for k in ENTRY_KEYS if k not in entry]
    if missing:
        raise ValueError(f"{where}: missing {missing} (expected keys {list(ENTRY_KEYS)})")
    for key in ("video_id", "category_id"):
        if isinstance(entry[key], bool) or not isinstance(entry[key], int):
            raise ValueError(f"{where}: '{key}' must be an int, got {entry[key]!r}")
    if isinstance(entry["score"], bool) or not isinstance(entry["score"], (int, float)) \
            or not math.isfinite(entry["score"]):
        raise ValueError(f"{where}: 'score' must be a finite number, got {entry['score']!r}")
    segs = entry["segmentations"]
    if not isinstance(segs, (list, tuple)):
        raise ValueError(f"{where}: 'segmentations' must be a list (RLE or None per frame), got {type(segs).__name__}")
    for f, rle in enumerate(segs):
        if rle is not None and not (isinstance(rle, dict) and isinstance(rle.get("counts"), str)
                                    and len(rle.get("size", ())) == 2):
            raise ValueError(f"{where}: segmentations[{f}] must be null or an RLE "
                             "{'size': [H, W], 'counts': str}")


def merge_results(per_video: Iterable[Sequence[dict]]) -> list[dict]:
    """Concatenate per-video result lists, keeping each video once.

    per_video: lists of entries, one list per processed video (from any number of processes). A video
    processed twice (distributed samplers pad the last batch with repeats) keeps its first list; an
    empty list (no track survived the thresholds) contributes nothing.
    """
    merged: list[dict] = []
    seen: set[int] = set()
    for i, entries in enumerate(per_video):
        ids = {e["video_id"] for e in entries}
        if len(ids) > 1:
            raise ValueError(f"merge_results: result list {i} mixes videos {sorted(ids)}; expected one video per list")
        if ids and next(iter(ids)) in seen:
            continue
        seen |= ids
        merged.extend(entries)
    return merged




def write_results(results: Sequence[dict], out_dir: str | os.PathLike) -> tuple[str, str]:
    """Write ``results.json`` and ``results.zip`` (holding ``results.json`` at its root, as the
    YouTube-VIS / OVIS evaluation servers expect) into ``out_dir``; both are written atomically.

    Returns the two paths. Invalid entries raise ValueError naming the entry and the field.
    """
    for i, entry in enumerate(results):
        check_entry(entry, f"results[{i}]")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    text = json.dumps(list(results), allow_nan=False)
    json_path, zip_path = os.path.join(out_dir, RESULTS_NAME), os.path.join(out_dir, ZIP_NAME)

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    def write_zip(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(RESULTS_NAME, text)

    atomic_write(json_path, write_json)
    atomic_write(zip_path, write_zip)
    return json_path, zip_path


def read_results(path: str | os.PathLike) -> list[dict]:
    """Load results from a ``results.json`` or a ``results.zip`` holding one; entries are checked."""
    path = os.fspath(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                if RESULTS_NAME not in zf.namelist():
                    raise ValueError(f"{path}: the zip holds {zf.namelist()}, expected {RESULTS_NAME!r} at its root")
                results = json.loads(zf.read(RESULTS_NAME).decode("utf-8"))
        else:
            with open(path, encoding="utf-8") as fh:
                results = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(results, list):
        raise ValueError(f"{path}: expected a JSON list of result entries, got {type(results).__name__}")
    for i, entry in enumerate(results):
        check_entry(entry, f"{path}: entry {i}")
    return results
