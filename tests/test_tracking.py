"""Tests for devis_core/tracking.py (clip partition, costs, clip tracker) and devis_core/results.py."""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from devis_core.config import get_cfg_defaults
from devis_core.results import merge_results, read_results, write_results
from devis_core.tracking import (ClipTracker, binary_mask_iou, build_tracker, centre_distance, class_agreement,
                                 final_category, final_score, partition_clips, score_distance, soft_mask_iou,
                                 stitching_cost)
from parity_tracker import check_tracker_fixture

FIXTURE = Path(__file__).parent / "fixtures" / "parity" / "tracker_public.pt"


# ------------------------------------------------------------------------------------------ partition
@pytest.mark.parametrize("length,frames,expected", [
    (3, 8, [0, 1, 2, 1, 0, 1, 2, 1]),
    (2, 5, [0, 1, 0, 1, 0]),
    (1, 3, [0, 0, 0]),
    (4, 6, [0, 1, 2, 3, 2, 1]),
])
def test_partition_short_video_ping_pong(length, frames, expected):
    assert partition_clips(length, frames, 1) == ([expected], 0)


def test_partition_video_of_clip_length():
    assert partition_clips(6, 6, 4) == ([[0, 1, 2, 3, 4, 5]], 0)


def test_partition_end_aligned_last_clip():
    clips, last_real_idx = partition_clips(11, 6, 4)
    assert clips == [list(range(0, 6)), list(range(4, 10)), list(range(5, 11))]
    assert last_real_idx == 3


def test_partition_matches_fixture():
    fixture = torch.load(FIXTURE, weights_only=True)
    clips, last_real_idx = partition_clips(fixture["video_length"], fixture["num_frames"], fixture["stride"])
    assert clips == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9], [7, 8, 9, 10]]
    assert clips == [list(c) for c in fixture["clips"]]
    assert last_real_idx == fixture["last_real_idx"] == 1


@pytest.mark.parametrize("stride", [0, 4, 5, -1])
def test_partition_rejects_stride_outside_range(stride):
    with pytest.raises(ValueError, match="STRIDE"):
        partition_clips(10, 4, stride)


def test_partition_properties():
    for frames in range(2, 8):
        for stride in range(1, frames):
            for length in range(frames, 30):
                clips, lri = partition_clips(length, frames, stride)
                starts = [c[0] for c in clips]
                assert all(c == list(range(c[0], c[0] + frames)) for c in clips)
                assert sorted(set(sum(clips, []))) == list(range(length))
                assert starts[-1] == length - frames
                assert all(b - a == stride for a, b in zip(starts[:-2], starts[1:-1]))
                if len(clips) > 1:
                    regular_next = starts[-2] + stride
                    assert regular_next + frames >= length and regular_next - starts[-1] == lri
                    assert 0 <= lri < stride


# ---------------------------------------------------------------------------------------------- costs
def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_soft_mask_iou_volumetric_and_frame_average():
    a = [_t([[1.0, 0.5], [0.0, 0.0]]), _t([[0.0, 0.0], [0.0, 1.0]])]
    b = [_t([[0.5, 0.5], [0.0, 0.0]]), _t([[0.0, 0.0], [0.0, 0.0]])]
    zero = [torch.zeros(2, 2, dtype=torch.float64)] * 2
    # a·b: intersection 1·0.5 + 0.5·0.5 = 0.75; union (1 + 0.75) + 1 = 2.75
    # a·a is soft, not 1: intersection 1 + 0.25 + 1 = 2.25; union 1 + 0.75 + 1 = 2.75
    vol = soft_mask_iou([a, zero], [b, a])
    np.testing.assert_allclose(vol, [[3 / 11, 9 / 11], [0.0, 0.0]], rtol=0, atol=1e-15)
    # per frame: 0.75 / 1.75 and 0 / 1
    avg = soft_mask_iou([a], [b], frame_average=True)
    np.testing.assert_allclose(avg, [[3 / 14]], rtol=0, atol=1e-15)
    # both empty: the union is clamped, IoU 0 rather than NaN
    assert soft_mask_iou([zero], [zero])[0, 0] == 0.0


def _rle(rows):
    rle = mask_util.encode(np.asfortranarray(np.array(rows, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


def test_binary_mask_iou_volumetric_and_frame_average():
    a = [_rle([[1, 1], [0, 0]]), _rle([[0, 0], [0, 1]])]
    b = [_rle([[1, 0], [0, 0]]), None]
    np.testing.assert_allclose(binary_mask_iou([a], [b]), [[1 / 3]])
    np.testing.assert_allclose(binary_mask_iou([a], [b], frame_average=True), [[1 / 4]])
    empty = [_rle([[0, 0], [0, 0]]), None]
    assert binary_mask_iou([empty], [empty])[0, 0] == 0.0


def test_class_score_centre_costs():
    same = class_agreement(np.array([[1, 1], [2, 3]]), np.array([[1, 2], [3, 3]]))
    assert same.dtype == np.float32
    np.testing.assert_array_equal(same, [[0.5, 0.0], [0.0, 0.5]])
    sc = score_distance(np.array([[0.9, 0.7]]), np.array([[0.6, 0.8], [0.9, 0.7]]))
    assert sc.dtype == np.float32
    np.testing.assert_allclose(sc, [[0.2, 0.0]], atol=1e-7)
    ctr = centre_distance(np.array([[[0.5, 0.5], [0.6, 0.5]]]), np.array([[[0.4, 0.7], [0.6, 0.5]]]))
    np.testing.assert_allclose(ctr, [[0.075]], atol=1e-7)   # frame 0: (0.1 + 0.2) / 2, frame 1: 0


def test_stitching_cost_signs_and_weights():
    one = np.ones((1, 1), dtype=np.float32)
    cost = stitching_cost(np.array([[0.5]]), one, 0.2 * one, 0.1 * one,
                          mask_cost=2, class_cost=3, score_cost=4, center_cost=5)
    np.testing.assert_allclose(cost, [[-1.0 - 3.0 + 0.8 + 0.5]], atol=1e-6)
    # a zero weight drops the cue entirely (the cue may then be absent)
    cost = stitching_cost(np.array([[0.5]]), one, 0.2 * one, None, mask_cost=1, class_cost=1, score_cost=1,
                          center_cost=0)
    np.testing.assert_allclose(cost, [[-0.5 - 1.0 + 0.2]], atol=1e-6)


def test_final_score_and_category_policies():
    assert final_score(np.array([0.9, 0.6, 0.9]), "mean") == pytest.approx(0.8, abs=1e-15)
    assert final_score(np.array([0.9, 0.6, 0.8, 0.1]), "median") == pytest.approx(0.7, abs=1e-15)
    cats, scores = np.array([1, 1, 3]), np.array([0.1, 0.1, 0.9])
    assert final_category(cats, scores, "most_common") == 1
    assert final_category(cats, scores, "score_weighting") == 3
    assert final_category(np.array([5, 2]), np.array([0.5, 0.5]), "most_common") == 2     # tie -> smaller id
    assert final_category(np.array([5, 2]), np.array([0.5, 0.5]), "score_weighting") == 5  # tie -> first seen
    with pytest.raises(ValueError, match="FINAL_SCORE_POLICY"):
        final_score(np.array([0.5]), "max")


# -------------------------------------------------------------------------------------------- tracker
H = W = 4


def _region(rows, cols):
    m = torch.full((H, W), -10.0, dtype=torch.float64)
    m[rows[0]:rows[1], cols[0]:cols[1]] = 10.0
    return m


A, A_WIDE, B = _region((0, 2), (0, 2)), _region((0, 2), (0, 3)), _region((2, 4), (2, 4))


def _clip(scores, labels, masks):
    """Clip result with K tracks, mask id k for track k. scores/labels: K lists of 4; masks: K (H, W)."""
    scores = torch.tensor(scores, dtype=torch.float64).T
    labels = torch.tensor(labels, dtype=torch.int64)[None].expand(4, -1)
    k = scores.shape[1]
    return {"scores": scores, "labels": labels.clone(), "boxes": torch.zeros(4, k, 4, dtype=torch.float64),
            "center_points": torch.full((4, k, 2), 0.5, dtype=torch.float64),
            "masks": torch.stack(masks, 0)[None].expand(4, -1, -1, -1).clone(),
            "inverse_idxs": torch.arange(k)}


# Clip 0 (frames 0-3): track 0 = object A (category 1), track 1 = object B (category 2).
CLIP0 = _clip([[0.9, 0.9, 0.5, 0.8], [0.3, 0.4, 0.6, 0.2]], [1, 2], [A, B])
# Clip 1 (frames 2-5): the same objects in the other order; A is seen wider and as category 3.
CLIP1 = _clip([[0.5, 0.1, 0.4, 0.4], [0.6, 0.7, 0.9, 0.9]], [2, 3], [B, A_WIDE])


def _run(**kwargs):
    args = dict(num_out=2, min_frame_score=0.001, min_track_score=0.002, min_detections=1)
    args.update(kwargs)
    tracker = ClipTracker(7, 6, (H, W), num_frames=4, stride=2, **args)
    tracker.add_clip(CLIP0, 0)
    tracker.add_clip(CLIP1, 2)
    return tracker.finish()


def _area(rle):
    return None if rle is None else int(mask_util.area(rle))


def test_tracker_higher_score_wins_on_overlap():
    results = _run()
    assert [r["video_id"] for r in results] == [7, 7]
    a, b = results
    # A: frame 2 taken from clip 1 (0.6 > 0.5, wide mask, 6 px), frame 3 kept (0.7 < 0.8, 4 px)
    assert [_area(r) for r in a["segmentations"]] == [4, 4, 6, 4, 6, 6]
    assert a["score"] == pytest.approx((0.9 + 0.9 + 0.6 + 0.8 + 0.9 + 0.9) / 6, abs=1e-12)
    assert a["category_id"] == 1          # categories 1,1,3,1,3,3: tie -> smaller id
    assert b["category_id"] == 2
    assert b["score"] == pytest.approx((0.3 + 0.4 + 0.6 + 0.2 + 0.4 + 0.4) / 6, abs=1e-12)
    decoded = mask_util.decode(b["segmentations"][5])
    np.testing.assert_array_equal(decoded, (B > 0).numpy().astype(np.uint8))


def test_tracker_min_frame_score_and_min_detections():
    a, b = _run(min_frame_score=0.35)
    assert [s is None for s in b["segmentations"]] == [True, False, False, True, False, False]
    assert b["score"] == pytest.approx((0.4 + 0.6 + 0.4 + 0.4) / 4, abs=1e-12)
    assert all(s is not None for s in a["segmentations"])
    only_a = _run(min_frame_score=0.35, min_detections=5)
    assert len(only_a) == 1 and only_a[0]["category_id"] == 1


def test_tracker_min_track_score_and_median_policy():
    kept = _run(min_track_score=0.5)
    assert [r["category_id"] for r in kept] == [1]
    median = _run(final_score_policy="median")
    assert median[0]["score"] == pytest.approx(0.9, abs=1e-15)


@pytest.mark.parametrize("binary,average", [(True, False), (False, True), (True, True)])
def test_tracker_iou_options_give_the_same_tracks_here(binary, average):
    # Masks are near-binary, so every IoU option must make the same decisions as the default.
    reference = _run()
    other = _run(use_binary_mask_iou=binary, use_frame_average_iou=average)
    assert [(r["category_id"], r["score"], [_area(s) for s in r["segmentations"]]) for r in other] == \
           [(r["category_id"], r["score"], [_area(s) for s in r["segmentations"]]) for r in reference]


def test_tracker_per_class_matching_kills_and_starts_tracks():
    results = _run(per_class_matching=True)
    assert [r["category_id"] for r in results] == [1, 2, 3]
    killed, matched, born = results
    # category 1 vanished in clip 1: its track ends at the stitched frames, no overlap replacement
    assert [_area(s) for s in killed["segmentations"]] == [4, 4, 4, 4, None, None]
    assert killed["score"] == pytest.approx((0.9 + 0.9 + 0.5 + 0.8) / 4, abs=1e-12)
    assert [s is None for s in matched["segmentations"]] == [False] * 6
    # category 3 is new: it starts at clip 1's first frame
    assert [_area(s) for s in born["segmentations"]] == [None, None, 6, 6, 6, 6]
    assert born["score"] == pytest.approx((0.6 + 0.7 + 0.9 + 0.9) / 4, abs=1e-12)


def test_tracker_keeps_only_overlap_frames_soft():
    gen = torch.Generator().manual_seed(0)
    length, frames, stride = 12, 4, 2
    clips, _ = partition_clips(length, frames, stride)
    tracker = ClipTracker(1, length, (H, W), num_frames=frames, stride=stride, num_out=3)
    for clip in clips:
        result = {"scores": torch.rand(4, 3, generator=gen, dtype=torch.float64),
                  "labels": torch.randint(1, 4, (1, 3), generator=gen).expand(4, 3).clone(),
                  "boxes": torch.rand(4, 3, 4, generator=gen, dtype=torch.float64),
                  "center_points": torch.rand(4, 3, 2, generator=gen, dtype=torch.float64),
                  "masks": torch.randn(4, 2, 2, 2, generator=gen, dtype=torch.float64),
                  "inverse_idxs": torch.tensor([0, 1, 1])}
        tracker.add_clip(result, clip[0])
        for track in tracker.tracks:
            soft = [f for f, m in enumerate(track.masks) if isinstance(m, torch.Tensor)]
            last = clip[0] + frames >= length
            allowed = range(tracker.last_t - tracker.overlap, tracker.last_t) if not last else range(length - frames, length)
            assert set(soft) <= set(allowed), (clip, soft)
    results = tracker.finish()
    assert all(isinstance(s, dict) or s is None for r in results for s in r["segmentations"])
    assert all(len(r["segmentations"]) == length for r in results)


def test_tracker_rejects_bad_input():
    with pytest.raises(ValueError, match="STRIDE"):
        ClipTracker(1, 10, (H, W), num_frames=4, stride=4)
    tracker = ClipTracker(1, 6, (H, W), num_frames=4, stride=2, num_out=2)
    with pytest.raises(ValueError, match="first clip must start at frame 0"):
        tracker.add_clip(CLIP0, 1)
    with pytest.raises(KeyError, match="inverse_idxs"):
        tracker.add_clip({k: v for k, v in CLIP0.items() if k != "inverse_idxs"}, 0)
    tracker.add_clip(CLIP0, 0)
    with pytest.raises(ValueError, match="does not continue"):
        tracker.add_clip(CLIP1, 3)
    with pytest.raises(RuntimeError, match="never covered"):
        tracker.finish()
    with pytest.raises(ValueError, match="TEST.NUM_OUT=3"):
        ClipTracker(1, 6, (H, W), num_frames=4, stride=2, num_out=3).add_clip(CLIP0, 0)


def test_build_tracker_reads_config():
    cfg = get_cfg_defaults()
    cfg.merge_from_list(["TEST.NUM_OUT", 7, "TEST.CLIP_TRACKING.CENTER_COST", 1, "MODEL.DEVIS.NUM_FRAMES", 6,
                         "TEST.CLIP_TRACKING.MIN_DETECTIONS", 3])
    tracker = build_tracker(cfg, 5, 20, (30, 40))
    assert (tracker.num_out, tracker.num_frames, tracker.stride, tracker.overlap) == (7, 6, 4, 2)
    assert tracker.costs == {"mask_cost": 1, "class_cost": 1, "score_cost": 1, "center_cost": 1}
    assert (tracker.min_detections, tracker.video_id, tracker.original_size) == (3, 5, (30, 40))


# The CPU tracker parity runs in tests/test_parity.py with the other parity fixtures.
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tracker_parity_with_official_fixture_on_cuda():
    check_tracker_fixture(torch.load(FIXTURE, weights_only=True), device="cuda")


def test_tracker_short_video_uses_first_frames_only():
    # L=3 < T=4: one ping-pong clip [0, 1, 2, 1]; its 4th output is padding and must be ignored.
    clip = dict(CLIP0)
    clip["scores"] = torch.tensor([[0.9, 0.5], [0.7, 0.5], [0.8, 0.5], [0.0, 0.0]], dtype=torch.float64)
    tracker = ClipTracker(3, 3, (H, W), num_frames=4, stride=2, num_out=2)
    tracker.add_clip(clip, 0, clip_length=3)
    a, b = tracker.finish()
    assert a["score"] == pytest.approx(0.8, abs=1e-12) and b["score"] == pytest.approx(0.5, abs=1e-12)
    assert [_area(s) for s in a["segmentations"]] == [4, 4, 4]
    assert all(not isinstance(m, torch.Tensor) for t in tracker.tracks for m in t.masks)


# -------------------------------------------------------------------------------------------- results
def _entry(video_id, score=0.5):
    return {"video_id": video_id, "score": score, "category_id": 3,
            "segmentations": [_rle([[1, 0], [0, 0]]), None]}


def test_write_results_json_and_zip(tmp_path):
    results = [_entry(1), _entry(2, 0.25)]
    json_path, zip_path = write_results(results, tmp_path / "out")
    with open(json_path) as fh:
        text = fh.read()
    assert json.loads(text) == results
    assert '"segmentations": [{"size": [2, 2], "counts": "' in text and "null]" in text
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.namelist() == ["results.json"]
        assert zf.read("results.json").decode() == text
    assert read_results(zip_path) == results == read_results(json_path)
    assert sorted(os.listdir(tmp_path / "out")) == ["results.json", "results.zip"]


def test_write_results_is_atomic(tmp_path, monkeypatch):
    write_results([_entry(1)], tmp_path)
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(ValueError, match=r"results\[1\].*'score'"):
        write_results([_entry(1), _entry(2, float("nan"))], tmp_path)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", broken)
    with pytest.raises(OSError, match="disk full"):
        write_results([_entry(9)], tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["results.json", "results.zip"]     # no temporary left behind
    monkeypatch.undo()
    assert read_results(tmp_path / "results.zip") == json.loads(before)        # the old zip is intact


def test_read_results_errors(tmp_path):
    bad_zip = tmp_path / "x.zip"
    with zipfile.ZipFile(bad_zip, "w") as zf:
        zf.writestr("other.json", "[]")
    with pytest.raises(ValueError, match="expected 'results.json'"):
        read_results(bad_zip)
    bad_entry = tmp_path / "r.json"
    bad_entry.write_text(json.dumps([{"video_id": 1, "score": 0.5, "category_id": 2}]))
    with pytest.raises(ValueError, match="entry 0.*segmentations"):
        read_results(bad_entry)


def test_merge_results_keeps_each_video_once():
    merged = merge_results([[_entry(1), _entry(1, 0.1)], [], [_entry(2)], [_entry(1, 0.9)]])
    assert [(e["video_id"], e["score"]) for e in merged] == [(1, 0.5), (1, 0.1), (2, 0.5)]
    with pytest.raises(ValueError, match="mixes videos"):
        merge_results([[_entry(1), _entry(2)]])


def test_encode_masks_batches_the_same_rles_as_one_by_one():
    from pycocotools import mask as mask_util

    from devis_core.tracking import encode_mask, encode_masks
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 5, 7, generator=g)
    probs[1] = 0.5                                    # exactly 0.5 is background (> 0.5 is foreground)
    batched = encode_masks(probs)
    listed = encode_masks([probs[0], probs[1] > 0.5, probs[2]])       # probabilities or ready binaries
    for i in range(3):
        decoded = mask_util.decode(dict(batched[i], counts=batched[i]["counts"].encode()))
        assert decoded.tolist() == (probs[i] > 0.5).to(torch.uint8).tolist()
        assert batched[i] == listed[i] == encode_mask(probs[i])
        assert batched[i]["size"] == [5, 7] and isinstance(batched[i]["counts"], str)
    assert not mask_util.decode(dict(batched[1], counts=batched[1]["counts"].encode())).any()
    assert encode_masks([]) == []


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_encode_masks_equals_pycocotools_encode(device):
    """Run boundaries found with tensor ops give pycocotools' own strings, including the masks whose
    runs start or end at the corners (all on, all off, a single pixel at either end)."""
    import numpy as np
    from pycocotools import mask as mask_util

    from devis_core.tracking import encode_masks
    g = torch.Generator().manual_seed(3)
    h, w = 37, 53
    binary = torch.rand(12, h, w, generator=g) > 0.7
    binary[1] = True
    binary[2] = False
    binary[3] = False
    binary[3, 0, 0] = True                        # a run of one at the start (Fortran order)
    binary[4] = False
    binary[4, -1, -1] = True                      # ... and at the end
    binary[5] = True
    binary[5, 0, 0] = False
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    binary[6] = (yy - 18) ** 2 + (xx - 20) ** 2 < 81      # a blob: long runs, the usual case
    expected = mask_util.encode(np.asfortranarray(binary.numpy().astype(np.uint8).transpose(1, 2, 0)))
    got = encode_masks(binary.float().to(device))
    assert [r["counts"] for r in got] == [r["counts"].decode() for r in expected]
    assert all(r["size"] == [h, w] for r in got)
    one = torch.zeros(1, 1, 1)
    assert encode_masks(one.to(device)) == [{"size": [1, 1], "counts": mask_util.encode(
        np.zeros((1, 1, 1), np.uint8, order="F"))[0]["counts"].decode()}]
    assert encode_masks(torch.zeros(0, h, w, device=device)) == []
