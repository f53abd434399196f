"""Results browser and attention explorer (devis_core.widgets), driven from code without a browser."""
from __future__ import annotations

import io

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from devis_core.visualize import PALETTE, render_frame_png
from devis_core.widgets import AttentionExplorer, AttentionShown, ResultsBrowser, ResultsShown

H, W = 24, 32
BACKGROUND = (10, 100, 200)


def rle(y0, y1, x0, x1) -> dict:
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    out = mask_util.encode(np.asfortranarray(m))
    out["counts"] = out["counts"].decode("ascii")
    return out


def video(n: int, shade: int = 0) -> list[np.ndarray]:
    return [np.full((H, W, 3), (BACKGROUND[0] + shade + t, BACKGROUND[1], BACKGROUND[2]), np.uint8)
            for t in range(n)]


FRAMES = {7: video(3), 9: video(2, shade=50)}
ENTRIES = [
    {"video_id": 7, "score": 0.9, "category_id": 1, "segmentations": [rle(12, 22, 14, 30), rle(12, 22, 14, 30), None]},
    {"video_id": 9, "score": 0.8, "category_id": 2, "segmentations": [rle(2, 8, 2, 8), None]},
    {"video_id": 7, "score": 0.3, "category_id": 2, "segmentations": [rle(2, 8, 2, 8), None, rle(2, 8, 2, 8)]},
]


def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def test_results_browser_controls_change_what_is_shown():
    b = ResultsBrowser(FRAMES, ENTRIES, category_names={1: "duck", 2: "cat"})
    assert b.shown == ResultsShown(video_id=7, frame=0, track_ids=(0, 1), score_threshold=0.0)
    assert list(b.toggles) == [0, 1] and b.toggles[1].description == "1: cat 0.30"
    first = b.image.value
    # Scale 2: frame pixel (16, 20) -> PNG pixel (33, 41); track 0 is palette colour 0 blended at 0.5.
    expected = np.floor((np.array(BACKGROUND) + PALETTE[0]) / 2 + 0.5)
    assert tuple(png_pixels(first)[33, 41]) == tuple(expected.astype(np.uint8))

    b.frame.value = 1
    assert b.shown.frame == 1 and b.shown.track_ids == (0,)
    assert b.image.value != first

    b.frame.value = 0
    b.threshold.value = 0.5
    assert b.shown.track_ids == (0,) and b.shown.score_threshold == 0.5
    assert b.toggles[1].disabled and not b.toggles[0].disabled
    thresholded = b.image.value
    assert thresholded != first

    b.toggles[0].value = False
    assert b.shown.track_ids == ()
    assert b.image.value == render_frame_png(FRAMES[7][0], scale=2.0)     # nothing drawn: the plain frame

    b.play.value = 2                      # Play drives the slider
    assert b.frame.value == 2 and b.shown.frame == 2

    b.video.value = 9
    assert b.shown == ResultsShown(video_id=9, frame=0, track_ids=(0,), score_threshold=0.5)
    assert b.frame.max == 1 and list(b.toggles) == [0]
    b.video.value = 7
    assert not b.toggles[0].value         # the untick of (video 7, track 0) is remembered
    assert "0 track(s) drawn" in b.status.value


def test_results_browser_sources_and_errors():
    # A callable source: the videos are those of the results, in first-seen order.
    b = ResultsBrowser(lambda vid: FRAMES[vid], ENTRIES, video_id=9)
    assert [v for _, v in b.video.options] == [7, 9] and b.shown.video_id == 9
    assert ResultsBrowser(FRAMES, ENTRIES, max_videos=1).video.options[0][1] == 7
    with pytest.raises(ValueError, match="video 7 has 3 frames but its track\\(s\\) \\[0\\]"):
        ResultsBrowser(FRAMES, [dict(ENTRIES[0], segmentations=[None, None])])
    with pytest.raises(ValueError, match="entries\\[0\\].*score"):
        ResultsBrowser(FRAMES, [dict(ENTRIES[0], score="high")])
    with pytest.raises(KeyError, match="video id 3"):
        ResultsBrowser(FRAMES, ENTRIES, video_id=3)


def _attn(layer: int, scale: float) -> dict:
    """T=2 frames, N_q=2 slots, M=2 heads, L=2 levels, P=1 point; weights per head sum to 1."""
    t, q, m, lv = 2, 2, 2, 2
    weights = torch.zeros(t, q, m, lv, 1)
    t_weights = torch.zeros(t, q, m, 1, lv, 1)
    # head 0 puts 0.25*scale on the own frame (level 0), the rest on the other frame (level 1);
    # head 1 puts 0.5 on each frame (level 0 both).
    weights[:, :, 0, 0, 0] = 0.25 * scale
    t_weights[:, :, 0, 0, 1, 0] = 1 - 0.25 * scale
    weights[:, :, 1, 0, 0] = 0.5
    t_weights[:, :, 1, 0, 0, 0] = 0.5
    locs = torch.full((t, q, m, lv, 1, 2), 0.5)
    t_locs = torch.full((t, q, m, 1, lv, 1, 2), 0.25)
    refs = torch.tensor([0.5, 0.5, 0.4, 0.4]).expand(t, q, 4).clone()
    return {"layer": layer, "spatial_shapes": torch.tensor([[4, 4], [2, 2]]), "frame_size": (H, W),
            "locations": locs, "weights": weights, "references": refs,
            "temporal_frames": torch.tensor([[1], [0]]), "temporal_locations": t_locs,
            "temporal_weights": t_weights, "temporal_references": refs[:, :, None].clone(),
            "pred_boxes": refs.clone(),
            "topk": {"scores": torch.tensor([[0.7, 0.2], [0.5, 0.4]]), "labels": torch.tensor([[1, 2], [1, 2]]),
                     "top_k_idxs": torch.tensor([1, 0]), "inverse_idxs": torch.tensor([1, 0]),
                     "masks": torch.full((t, 2, 6, 8), -3.0)}}


def test_attention_explorer_controls_change_what_is_shown():
    frames = video(2)
    e = AttentionExplorer(frames, [_attn(0, 1.0), _attn(1, 2.0)], category_names={1: "duck"})
    # Default: last layer, track 0 (slot 1), query frame 0, everything merged: 2 heads' mass.
    assert e.shown == AttentionShown(layer=1, track=0, slot=1, frame=0, level="merged", head="all",
                                     frame_weights=pytest.approx((0.5 + 0.5, 0.5 + 0.5)))
    assert e.track.options[0] == ("0: slot 1 · duck 0.60", 0)
    img = e.image.value
    e.head.value = 0
    assert e.shown.head == 0 and e.shown.frame_weights == pytest.approx((0.5, 0.5))
    assert e.image.value != img
    e.layer.value = 0
    assert e.shown.layer == 0 and e.shown.frame_weights == pytest.approx((0.25, 0.75))
    e.level.value = 1                     # head 0's level-1 weight lies on the other frame only
    assert e.shown.frame_weights == pytest.approx((0.0, 0.75))
    e.frame.value = 1
    assert e.shown.frame == 1 and e.shown.frame_weights == pytest.approx((0.75, 0.0))
    e.track.value = 1
    assert e.shown.track == 1 and e.shown.slot == 0
    assert "weights per frame" in e.status.value
