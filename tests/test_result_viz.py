"""Result pictures (devis_core.result_viz): RGB-correct overlays, file layout, GIF, many tracks, atomic writes."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from devis_core import result_viz
from devis_core.result_viz import (render_overlay, save_clip_visualisation, track_overlay,
                                   write_video_visualisations)
from devis_core.visualize import PALETTE

H, W = 40, 60
BACKGROUND = (10, 100, 200)


def rle(mask: np.ndarray) -> dict:
    out = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    out["counts"] = out["counts"].decode("ascii")
    return out


def box_mask(y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def frames(n: int) -> list[np.ndarray]:
    return [np.full((H, W, 3), BACKGROUND, np.uint8) for _ in range(n)]


def entry(segs, score=0.9, category_id=2, video_id=7) -> dict:
    return {"video_id": video_id, "score": score, "category_id": category_id,
            "segmentations": [None if m is None else rle(m) for m in segs]}


def test_overlay_pixels_are_rgb_blends():
    """Track 0 is palette colour (230, 25, 75); alpha 0.5 over (10, 100, 200) gives round_half_up of
    (120, 62.5, 137.5) = (120, 63, 138) — a BGR mix-up would give (42, 63, 215)."""
    assert tuple(PALETTE[0]) == (230, 25, 75)
    entries = [entry([box_mask(20, 36, 30, 56)])]
    pixels = render_overlay(frames(1)[0], track_overlay(entries, 0, (H, W)), alpha=0.5)
    assert pixels.shape == (H, W, 3) and pixels.dtype == np.uint8
    assert tuple(pixels[30, 45]) == (120, 63, 138)        # inside the mask, away from box line and label
    assert tuple(pixels[3, 3]) == BACKGROUND               # outside
    # Box line hugs the mask: mask pixel (row 35, col 40) lies under it, no longer the plain blend.
    assert tuple(pixels[35, 40]) != (120, 63, 138)


def test_higher_score_track_lies_on_top():
    low, high = box_mask(10, 30, 10, 40), box_mask(20, 38, 20, 58)
    entries = [entry([high], score=0.9), entry([low], score=0.3)]
    ov = track_overlay(entries, 0, (H, W), boxes=False)
    assert ov.ids == (1, 0)                                # drawn low score first
    pixels = render_overlay(frames(1)[0], ov, alpha=1.0)
    assert tuple(pixels[25, 30]) == tuple(PALETTE[0])      # overlap: track 0 (score 0.9) wins
    assert tuple(pixels[12, 12]) == tuple(PALETTE[1])


def test_file_layout_gif_and_jpeg_colours(tmp_path):
    n = 4
    segs0 = [box_mask(20, 36, 30, 56), None, box_mask(20, 36, 30, 56), box_mask(22, 38, 30, 56)]
    segs1 = [box_mask(2, 12, 2, 20)] * n
    entries = [entry(segs0, 0.9), entry(segs1, 0.05), entry([None] * n, 0.5)]
    paths = write_video_visualisations(frames(n), entries, tmp_path, score_threshold=0.1,
                                       category_names={2: "duck"})
    rel = sorted(os.path.relpath(p, tmp_path) for p in paths)
    expected = sorted([f"track_0/{t:05d}.jpg" for t in range(n)] + [f"track_2/{t:05d}.jpg" for t in range(n)]
                      + [f"merged/{t:05d}.jpg" for t in range(n)] + ["video.gif"])
    assert rel == expected                                  # track 1 is below the threshold
    assert sorted(os.listdir(tmp_path)) == ["merged", "track_0", "track_2", "video.gif"]
    with Image.open(tmp_path / "track_0" / "00000.jpg") as img:
        assert img.size == (W, H)
        px = np.asarray(img.convert("RGB"), dtype=int)
    assert np.abs(px[30, 45] - (120, 63, 138)).max() <= 6   # RGB survives JPEG
    with Image.open(tmp_path / "track_0" / "00001.jpg") as img:   # no mask on frame 1: the plain frame
        assert np.abs(np.asarray(img.convert("RGB"), dtype=int)[30, 45] - BACKGROUND).max() <= 6
    with Image.open(tmp_path / "video.gif") as gif:
        assert gif.n_frames == n and gif.size == (W, H)
        gif.seek(2)
        rgb = np.asarray(gif.convert("RGB"), dtype=int)
    assert np.abs(rgb[30, 45] - (120, 63, 138)).max() <= 12
    # PIL stores identical consecutive pictures once with the summed duration: the timing is kept.
    still = tmp_path / "still"
    write_video_visualisations(frames(3), [entry([segs1[0]] * 3)], still, per_track=False, merged=False, fps=5.0)
    with Image.open(still / "video.gif") as gif:
        durations = []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
    assert sum(durations) == 3 * 200


def test_many_tracks_get_distinct_colours_within_the_palette_cycle(tmp_path):
    n_tracks = 25
    segs = []
    for k in range(n_tracks):
        m = np.zeros((H, W), bool)
        m[(k // 5) * 8:(k // 5) * 8 + 6, (k % 5) * 12:(k % 5) * 12 + 10] = True
        segs.append(m)
    entries = [entry([segs[k]], score=0.5 + k / 100) for k in range(n_tracks)]
    ov = track_overlay(entries, 0, (H, W), boxes=False)
    assert sorted(ov.ids) == list(range(n_tracks))
    colours = {k: tuple(c) for k, c in zip(ov.ids, ov.colors)}
    cycle = len(PALETTE)
    for a in range(n_tracks):
        for b in range(a + 1, n_tracks):
            assert (colours[a] == colours[b]) == (a % cycle == b % cycle)
    # Labels left out: 25 of them would cover this tiny frame.
    pixels = render_overlay(frames(1)[0], dataclasses.replace(ov, texts=[""] * n_tracks), alpha=1.0)
    for k in range(n_tracks):
        r, c = (k // 5) * 8 + 3, (k % 5) * 12 + 5
        assert tuple(pixels[r, c]) == tuple(PALETTE[k % cycle])
    paths = write_video_visualisations(frames(1), entries, tmp_path, per_track=False, animation=None)
    assert [os.path.relpath(p, tmp_path) for p in paths] == ["merged/00000.jpg"]


def test_writes_are_atomic(tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append((os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(result_viz.os, "replace", spy)
    entries = [entry([box_mask(5, 15, 5, 25)] * 2)]
    paths = write_video_visualisations(frames(2), entries, tmp_path)
    assert sorted(dst for _, dst in replaced) == sorted(paths)
    for src, dst in replaced:
        assert os.path.dirname(src) == os.path.dirname(dst) and not os.path.exists(src)
    # A failing encoder leaves neither the target nor a temporary file behind.
    monkeypatch.setattr(result_viz, "_write_gif",
                        lambda path, pictures, fps: result_viz._write_atomic(path, _boom))
    out = tmp_path / "failed"
    with pytest.raises(OSError, match="disk full"):
        write_video_visualisations(frames(2), entries, out, per_track=False, merged=False)
    assert os.listdir(out) == []


def _boom(_fh):
    raise OSError("disk full")


def test_bad_input_is_named(tmp_path):
    entries = [entry([box_mask(5, 15, 5, 25)] * 2)]
    with pytest.raises(ValueError, match="entry 0 .*3 segmentations, expected one per frame \\(2\\)"):
        write_video_visualisations(frames(2), [entry([None] * 3)], tmp_path)
    with pytest.raises(ValueError, match="several videos"):
        write_video_visualisations(frames(2), entries + [entry([None] * 2, video_id=8)], tmp_path)
    with pytest.raises(ValueError, match=r"frames\[1\] must be \(H, W, 3\) uint8"):
        write_video_visualisations([frames(1)[0], np.zeros((H, W), np.uint8)], entries, tmp_path)
    with pytest.raises(ValueError, match="animation"):
        write_video_visualisations(frames(2), entries, tmp_path, animation="avi")
    try:
        import av  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="PyAV"):
            write_video_visualisations(frames(2), entries, tmp_path / "mp4", animation="mp4")
        assert not (tmp_path / "mp4").exists()


def test_clip_visualisation_before_stitching(tmp_path):
    """Two tracks sharing one trajectory mask (different classes), /4 logits upsampled to 40x60."""
    t_len, k = 2, 3
    logits = torch.full((t_len, 2, 10, 15), -5.0)
    logits[:, 0, 5:9, 7:14] = 5.0        # mask 0: rows ~20..36, cols ~28..56 after upsampling
    logits[:, 1, 0:3, 0:4] = 5.0
    clip_result = {
        "scores": torch.tensor([[0.9, 0.2, 0.6], [0.8, 0.1, 0.01]]),
        "labels": torch.tensor([[1, 2, 3], [1, 2, 3]]),
        "boxes": torch.tensor([[[28.0, 20.0, 56.0, 36.0], [0.0, 0.0, 16.0, 12.0], [28.0, 20.0, 56.0, 36.0]]] * t_len),
        "masks": logits, "inverse_idxs": torch.tensor([0, 1, 0]), "top_k_idxs": torch.tensor([4, 7, 4]),
        "center_points": torch.zeros(t_len, k, 2)}
    video = frames(6)
    paths = save_clip_visualisation(video, clip_result, [4, 5, 4], tmp_path, (H, W), min_track_score=0.3,
                                    min_frame_score=0.05)
    rel = sorted(os.path.relpath(p, tmp_path) for p in paths)
    # track 1 (mean 0.15) is dropped; track 2 scores 0.01 on frame 5, below min_frame_score.
    assert rel == ["merged/00004.jpg", "merged/00005.jpg", "track_0/00004.jpg", "track_0/00005.jpg",
                   "track_2/00004.jpg"]
    with Image.open(tmp_path / "track_0" / "00004.jpg") as img:
        px = np.asarray(img.convert("RGB"), dtype=int)
    assert np.abs(px[28, 42] - (120, 63, 138)).max() <= 6   # upsampled mask, palette colour 0
    assert np.abs(px[3, 3] - BACKGROUND).max() <= 6
    # The clip's own frames (as many as the ids) are accepted too.
    again = save_clip_visualisation(frames(3), clip_result, [4, 5, 4], tmp_path / "b", (H, W))
    assert len(again) == 2 * 3 + 2
    with pytest.raises(ValueError, match="original_size"):
        save_clip_visualisation(video, clip_result, [4, 5, 4], tmp_path / "c", (H + 1, W))
