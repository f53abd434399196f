"""Tracker parity: our ClipTracker fed the per-clip results of an official run must give the official
tracks (shared/parity/README.md, tracker fixture section).
"""
from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util

from devis_core.config import load_config
from devis_core.tracking import build_tracker, partition_clips

SCORE_TOL = 1e-9


def _decode(rle: dict) -> np.ndarray:
    return mask_util.decode({"size": list(rle["size"]), "counts": rle["counts"].encode("utf-8")
                             if isinstance(rle["counts"], str) else rle["counts"]})


def run_tracker_fixture(fixture: dict, run: str, device: str | None = None) -> list[dict]:
    """Our results for one stored run (``yt19`` or ``ovis``) of a loaded tracker fixture; ``device`` moves
    the clip results there first (the tracker then upsamples and compares masks on that device)."""
    rec = fixture["runs"][run]
    cfg = load_config(fixture["yaml"], list(fixture["overrides"]) + list(rec["tracking_overrides"]))
    length = int(fixture["video_length"])
    clips, last_real_idx = partition_clips(length, cfg.MODEL.DEVIS.NUM_FRAMES, cfg.TEST.CLIP_TRACKING.STRIDE)
    assert clips == [list(c) for c in fixture["clips"]], f"{run}: partition {clips} != fixture {fixture['clips']}"
    assert last_real_idx == fixture["last_real_idx"], f"{run}: last_real_idx {last_real_idx} != {fixture['last_real_idx']}"
    first = rec["results"][0]["video_id"] if rec["results"] else 1
    tracker = build_tracker(cfg, first, length, fixture["original_size"])
    for clip, result in zip(clips, rec["clip_results"]):
        if device is not None:
            result = {k: v.to(device) for k, v in result.items()}
        tracker.add_clip(result, clip[0])
    return tracker.finish()


def check_tracker_fixture(fixture: dict, device: str | None = None) -> None:
    """Assert that both stored runs give the official track count, order, categories, RLEs and scores."""
    assert fixture.get("kind") == "tracker", f"not a tracker fixture (kind={fixture.get('kind')!r})"
    for run, rec in fixture["runs"].items():
        ours, expected = run_tracker_fixture(fixture, run, device), rec["results"]
        assert len(ours) == len(expected), f"{run}: {len(ours)} tracks, official {len(expected)}"
        for i, (a, b) in enumerate(zip(ours, expected)):
            where = f"{run} track {i}"
            assert a["video_id"] == b["video_id"], f"{where}: video_id {a['video_id']} != {b['video_id']}"
            assert a["category_id"] == b["category_id"], f"{where}: category {a['category_id']} != {b['category_id']}"
            assert abs(a["score"] - b["score"]) <= SCORE_TOL, f"{where}: score {a['score']!r} != {b['score']!r}"
            sa, sb = a["segmentations"], b["segmentations"]
            assert len(sa) == len(sb), f"{where}: {len(sa)} frames, official {len(sb)}"
            for f, (ra, rb) in enumerate(zip(sa, sb)):
                assert (ra is None) == (rb is None), f"{where} frame {f}: null {ra is None} vs official {rb is None}"
                if ra is not None:
                    assert list(ra["size"]) == list(rb["size"]), f"{where} frame {f}: size {ra['size']} != {rb['size']}"
                    ma, mb = _decode(ra), _decode(rb)
                    assert np.array_equal(ma, mb), f"{where} frame {f}: masks differ on {int((ma != mb).sum())} pixels"
