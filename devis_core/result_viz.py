"""Pictures of inference results: per-track and merged frame overlays, per-clip results, animations.

What the official ``TEST.VIZ`` options wrote (spec §10), RGB-correct and for any number of tracks:
``write_video_visualisations`` turns the YouTube-VIS result entries of one video into per-track JPEGs
(``TEST.VIZ.OUT_VIZ_PATH``), merged JPEGs (``SAVE_MERGED_TRACKS``) and a GIF / MP4;
``save_clip_visualisation`` draws one clip's top tracks before stitching (``SAVE_CLIP_VIZ``).
Track k of a video keeps the palette colour ``color_for_id(k)`` everywhere (here and in the widgets).
Every file is written to a temporary name in its folder and renamed.
"""
from __future__ import annotations

import io
import os
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from devis_core.fileio import atomic_write
from devis_core.data.ytvis_format import decode_segmentation, mask_to_box
from devis_core.results import check_entry
from devis_core.visualize import Overlay, colors_for_ids, draw_instances

__all__ = ["ANIMATIONS", "track_label", "track_overlay", "render_overlay", "write_video_visualisations",
           "save_clip_visualisation"]

ANIMATIONS = ("gif", "mp4", None)
JPEG_QUALITY = 95


# --------------------------------------------------------------------------------------------------
# overlays


def track_label(category_id: int, score: float, category_names: Mapping[int, str] | None = None) -> str:
    """'<category name> <score, 2 decimals>' (the official '<class>|<score>' label, readable)."""
    name = (category_names or {}).get(int(category_id), f"class {int(category_id)}")
    return f"{name} {float(score):.2f}"


def check_video_entries(entries: Sequence[dict], num_frames: int, size: Sequence[int], where: str) -> None:
    """Raise ValueError unless ``entries`` are result entries of ONE video with ``num_frames`` per-frame
    segmentations of ``size`` (H, W)."""
    video_ids = set()
    for k, entry in enumerate(entries):
        check_entry(entry, f"{where}: entry {k}")
        video_ids.add(entry["video_id"])
        if len(entry["segmentations"]) != num_frames:
            raise ValueError(f"{where}: entry {k} (video {entry['video_id']}) has {len(entry['segmentations'])} "
                             f"segmentations, expected one per frame ({num_frames})")
        for t, rle in enumerate(entry["segmentations"]):
            if rle is not None and [int(v) for v in rle["size"]] != [int(size[0]), int(size[1])]:
                raise ValueError(f"{where}: entry {k}: segmentations[{t}] has size {rle['size']}, the frames are "
                                 f"{list(size)} (H, W)")
    if len(video_ids) > 1:
        raise ValueError(f"{where}: entries of several videos {sorted(video_ids)}; expected one video")


def track_overlay(entries: Sequence[dict], t: int, size: Sequence[int], visible: Iterable[int] | None = None,
                  category_names: Mapping[int, str] | None = None, *, boxes: bool = True,
                  decode: Callable[[int, int], np.ndarray] | None = None) -> Overlay:
    """Tracks of one video on frame t, ready for ``draw_instances``.

    entries: result entries of one video; track k is ``entries[k]`` and gets colour ``color_for_id(k)``.
    size: (H, W) of the frames. visible: track indices to draw (None: all). boxes: boxes tight around the
    masks (else rows of NaN, which draw_instances skips). decode: optional cached (k, t) -> (H, W) bool.
    Returns an Overlay over the visible tracks with a mask on frame t, lowest score first so the most
    confident track lies on top; ``ids`` are the track indices.
    """
    height, width = int(size[0]), int(size[1])
    keep = None if visible is None else {int(k) for k in visible}
    chosen = [k for k, e in enumerate(entries)
              if (keep is None or k in keep) and e["segmentations"][t] is not None]
    chosen.sort(key=lambda k: (entries[k]["score"], -k))
    masks = np.zeros((len(chosen), height, width), dtype=bool)
    for row, k in enumerate(chosen):
        masks[row] = decode(k, t) if decode is not None else \
            decode_segmentation(entries[k]["segmentations"][t], height, width)
    if boxes:
        box_rows = np.array([mask_to_box(m) if m.any() else (np.nan,) * 4 for m in masks], dtype=np.float64)
    else:
        box_rows = np.full((len(chosen), 4), np.nan)
    texts = [track_label(entries[k]["category_id"], entries[k]["score"], category_names) for k in chosen]
    return Overlay(ids=tuple(chosen), masks=masks, boxes_xywh=box_rows.reshape(len(chosen), 4), texts=texts,
                   colors=colors_for_ids(chosen))


def render_overlay(image: np.ndarray, overlay: Overlay, *, alpha: float = 0.5, fontsize: float = 8.0,
                   scale: float = 1.0) -> np.ndarray:
    """Draw an Overlay on a frame and return the picture as pixels.

    image: (H, W, 3) uint8 RGB. Returns (round(scale*H), round(scale*W), 3) uint8 RGB: away from box
    lines and labels, at scale 1 a pixel is exactly ``overlay_masks``' blend of the input pixel.
    """
    height, width = image.shape[:2]
    dpi = 100.0
    fig = Figure(figsize=(width * scale / dpi, height * scale / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    draw_instances(ax, image, alpha=alpha, fontsize=fontsize, **overlay.drawing())
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# --------------------------------------------------------------------------------------------------
# files


def _write_atomic(path: str, write: Callable[[io.BufferedWriter], None]) -> str:
    """Write through ``write(fileobj)`` into a temporary file next to ``path``, then rename it."""
    return atomic_write(path, write, mode="wb")


def _write_jpeg(path: str, pixels: np.ndarray) -> str:
    return _write_atomic(path, lambda fh: Image.fromarray(pixels).save(fh, format="JPEG", quality=JPEG_QUALITY))


def _write_gif(path: str, pictures: Sequence[np.ndarray], fps: float) -> str:
    images = [Image.fromarray(p) for p in pictures]
    return _write_atomic(path, lambda fh: images[0].save(fh, format="GIF", save_all=True, append_images=images[1:],
                                                         duration=max(int(round(1000.0 / fps)), 20), loop=0))


def _require_pyav():
    try:
        import av
    except ImportError as exc:
        raise RuntimeError("animation='mp4' needs PyAV (pip install av), which is not installed; use "
                           "animation='gif' or None") from exc
    return av


def _write_mp4(path: str, pictures: Sequence[np.ndarray], fps: float) -> str:
    av = _require_pyav()
    from fractions import Fraction

    height, width = pictures[0].shape[:2]
    # yuv420p needs even sides: pad the last row / column by repetition.
    pad_h, pad_w = height % 2, width % 2

    def write(fh) -> None:
        container = av.open(fh, mode="w", format="mp4")
        try:
            stream = container.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height, stream.pix_fmt = width + pad_w, height + pad_h, "yuv420p"
            for picture in pictures:
                padded = np.pad(picture, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(padded), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        finally:
            container.close()

    return _write_atomic(path, write)


def _check_frames(frames: Sequence[np.ndarray], where: str) -> tuple[list[np.ndarray], tuple[int, int]]:
    frames = [np.asarray(f) for f in frames]
    if not frames:
        raise ValueError(f"{where}: no frames")
    size = frames[0].shape[:2]
    for t, f in enumerate(frames):
        if f.ndim != 3 or f.shape[2] != 3 or f.dtype != np.uint8:
            raise ValueError(f"{where}: frames[{t}] must be (H, W, 3) uint8 RGB, got shape {f.shape} dtype {f.dtype}")
        if f.shape[:2] != size:
            raise ValueError(f"{where}: frames[{t}] is {f.shape[:2]}, frames[0] is {size}; one size per video")
    return frames, (int(size[0]), int(size[1]))


def write_video_visualisations(frames: Sequence[np.ndarray], entries: Sequence[dict], out_dir: str | os.PathLike, *,
                               per_track: bool = True, merged: bool = True, animation: str | None = "gif",
                               score_threshold: float = 0.0, category_names: Mapping[int, str] | None = None,
                               alpha: float = 0.5, fps: float = 5.0) -> list[str]:
    """Pictures of one video's tracks.

    frames: L frames (H, W, 3) uint8 RGB at the original size. entries: the YouTube-VIS result entries
    of ONE video ({video_id, score, category_id, segmentations: L RLEs or None}); track k = entries[k].
    Tracks with score < score_threshold are left out (the others keep their index k and colour).
    Writes, under out_dir: per_track: ``track_{k}/{t:05d}.jpg`` (every frame, that track's mask, box and
    '<class> <score>'); merged: ``merged/{t:05d}.jpg`` (all tracks, labels, no boxes: the paper
    figures); animation 'gif': ``video.gif`` (PIL) or 'mp4': ``video.mp4`` (PyAV; RuntimeError when not
    installed) of the merged frames at ``fps`` (PIL stores identical consecutive frames once, with their
    summed duration); None: no animation. category_names: id -> name.
    Returns the written paths in writing order.
    """
    where = "write_video_visualisations"
    if animation not in ANIMATIONS:
        raise ValueError(f"{where}: animation must be one of {ANIMATIONS}, got {animation!r}")
    if animation == "mp4":
        _require_pyav()
    if fps <= 0:
        raise ValueError(f"{where}: fps must be > 0, got {fps}")
    frames, size = _check_frames(frames, where)
    check_video_entries(entries, len(frames), size, where)
    kept = [k for k, e in enumerate(entries) if e["score"] >= score_threshold]
    out_dir = os.fspath(out_dir)
    cache: dict[tuple[int, int], np.ndarray] = {}

    def decode(k: int, t: int) -> np.ndarray:
        if (k, t) not in cache:
            cache[(k, t)] = decode_segmentation(entries[k]["segmentations"][t], *size)
        return cache[(k, t)]

    written: list[str] = []
    if per_track:
        for k in kept:
            for t, frame in enumerate(frames):
                overlay = track_overlay(entries, t, size, [k], category_names, decode=decode)
                path = os.path.join(out_dir, f"track_{k}", f"{t:05d}.jpg")
                written.append(_write_jpeg(path, render_overlay(frame, overlay, alpha=alpha)))
    pictures = []
    if merged or animation is not None:
        for t, frame in enumerate(frames):
            overlay = track_overlay(entries, t, size, kept, category_names, boxes=False, decode=decode)
            picture = render_overlay(frame, overlay, alpha=alpha)
            pictures.append(picture)
            if merged:
                written.append(_write_jpeg(os.path.join(out_dir, "merged", f"{t:05d}.jpg"), picture))
    if animation == "gif":
        written.append(_write_gif(os.path.join(out_dir, "video.gif"), pictures, fps))
    elif animation == "mp4":
        written.append(_write_mp4(os.path.join(out_dir, "video.mp4"), pictures, fps))
    return written


def _clip_frame(frames: Sequence[np.ndarray], frame_ids: Sequence[int], j: int) -> np.ndarray:
    # A list over the whole video is indexed by frame id; the clip's own frames (as many as ids, some id
    # beyond their count) by position. Both readings agree whenever both are possible (see the docstring).
    if max(frame_ids) < len(frames):
        return frames[frame_ids[j]]
    if len(frames) == len(frame_ids):
        return frames[j]
    raise ValueError(f"save_clip_visualisation: {len(frames)} frames given, clip frame ids {list(frame_ids)}: "
                     "pass the whole video's frames or exactly the clip's frames")


def save_clip_visualisation(frames: Sequence[np.ndarray], clip_result: Mapping, clip_frame_ids: Sequence[int],
                            out_dir: str | os.PathLike, original_size: Sequence[int], *,
                            category_names: Mapping[int, str] | None = None, min_frame_score: float = 0.0,
                            min_track_score: float = 0.0, alpha: float = 0.5) -> list[str]:
    """One clip's top tracks before stitching (the official SAVE_CLIP_VIZ).

    frames: the video's frames (H0, W0, 3) uint8 RGB indexed by frame id, or exactly the clip's frames in
    clip order. clip_result: the per-clip result of spec §7.3 — scores (T', K), labels (T', K) category
    ids, boxes (T', K, 4) xyxy pixels of the original size, masks (T', U, h, w) logits at 1/4 of the
    network input, inverse_idxs (K,) mask of each track; T' real frames. clip_frame_ids: the clip's video
    frame ids (``partition_clips``); the first T' are drawn. original_size: (H0, W0).
    Masks are upsampled bilinearly to (H0, W0) and kept where the probability > 0.5. Tracks whose mean
    score is not above min_track_score (when > 0) are skipped; frames scoring below min_frame_score are
    drawn without that track. Writes ``track_{k}/{frame id:05d}.jpg`` (mask, box, '<class> <score on that
    frame>') and ``merged/{frame id:05d}.jpg`` under out_dir. Returns the written paths.
    """
    import torch

    from devis_core.tracking import upsample_mask_probs

    where = "save_clip_visualisation"
    for key in ("scores", "labels", "boxes", "masks", "inverse_idxs"):
        if key not in clip_result:
            raise ValueError(f"{where}: clip_result has no {key!r} (expected the per-clip result of spec §7.3)")
    scores = torch.as_tensor(clip_result["scores"]).double().cpu().numpy()
    labels = torch.as_tensor(clip_result["labels"]).cpu().numpy()
    boxes = torch.as_tensor(clip_result["boxes"]).double().cpu().numpy()
    mask_logits = torch.as_tensor(clip_result["masks"])
    inverse = torch.as_tensor(clip_result["inverse_idxs"]).cpu().numpy()
    n_frames, n_tracks = scores.shape
    if mask_logits.dim() != 4 or mask_logits.shape[0] != n_frames:
        raise ValueError(f"{where}: masks must be (T'={n_frames}, U, h, w) logits, got {tuple(mask_logits.shape)}")
    if len(clip_frame_ids) < n_frames:
        raise ValueError(f"{where}: {len(clip_frame_ids)} clip frame ids for {n_frames} result frames")
    height, width = int(original_size[0]), int(original_size[1])
    frame_ids = [int(i) for i in clip_frame_ids[:n_frames]]
    pictures = [np.asarray(_clip_frame(frames, clip_frame_ids, j)) for j in range(n_frames)]
    _check_frames(pictures, where)
    if pictures[0].shape[:2] != (height, width):
        raise ValueError(f"{where}: frames are {pictures[0].shape[:2]}, original_size is {(height, width)}")
    kept = [k for k in range(n_tracks) if min_track_score <= 0 or scores[:, k].mean() > min_track_score]
    probs = {int(u): upsample_mask_probs(mask_logits[:, int(u)].float(), (height, width)).numpy() > 0.5
             for u in sorted({int(inverse[k]) for k in kept})}
    written = []
    for j, frame_id in enumerate(frame_ids):
        shown = [k for k in kept if scores[j, k] >= min_frame_score]
        shown.sort(key=lambda k: (scores[j, k], -k))      # most confident on top
        masks = np.stack([probs[int(inverse[k])][j] for k in shown]) if shown else \
            np.zeros((0, height, width), dtype=bool)
        xyxy = boxes[j, shown].reshape(len(shown), 4)
        xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1)
        texts = [track_label(labels[j, k], scores[j, k], category_names) for k in shown]
        colors = colors_for_ids(shown)
        for row, k in enumerate(shown):
            single = Overlay(ids=(k,), masks=masks[row:row + 1], boxes_xywh=xywh[row:row + 1],
                             texts=texts[row:row + 1], colors=colors[row:row + 1])
            path = os.path.join(os.fspath(out_dir), f"track_{k}", f"{frame_id:05d}.jpg")
            written.append(_write_jpeg(path, render_overlay(pictures[j], single, alpha=alpha)))
        everything = Overlay(ids=tuple(shown), masks=masks, boxes_xywh=np.full((len(shown), 4), np.nan),
                             texts=texts, colors=colors)
        path = os.path.join(os.fspath(out_dir), "merged", f"{frame_id:05d}.jpg")
        written.append(_write_jpeg(path, render_overlay(pictures[j], everything, alpha=alpha)))
    return written
