"""Matplotlib pictures of frames with instance masks, boxes and labels (RGB throughout, no pyplot state).

The primitives take plain arrays (image, masks, boxes, texts, colours) so ground truth, predictions and
tracks are drawn the same way; `gt_overlay` and `plot_video_grid` are the ground-truth front ends.
Colours are uint8 RGB triples everywhere; they are scaled to matplotlib's [0, 1] only when handed to
an artist, so no BGR/RGB swap can creep in (the official code blended in BGR space, spec §10).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

# 20 well separated colours (after Trubetskoy's "20 distinct colours", the pastels that sat close to
# each other swapped for darker ones; every pair is > 60 apart in RGB). Indexed by instance / track id
# modulo its length, so any number of ids works (the official merged map had 14 entries, spec §12.13).
PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (67, 99, 216), (245, 130, 49),
        (145, 30, 180), (66, 212, 244), (240, 50, 230), (191, 239, 69), (250, 190, 212),
        (70, 153, 144), (120, 60, 255), (154, 99, 36), (128, 0, 0), (170, 255, 195),
        (0, 80, 80), (0, 100, 0), (0, 0, 117), (169, 169, 169), (0, 130, 200),
    ],
    dtype=np.uint8,
)


def color_for_id(instance_id: int) -> tuple[int, int, int]:
    """Stable RGB colour of an instance / track / annotation id.

    instance_id: any integer (negative ids wrap too). Returns an (r, g, b) tuple of ints in 0..255;
    the same id always gets the same colour, consecutive ids get different ones.
    """
    if isinstance(instance_id, bool) or not isinstance(instance_id, (int, np.integer)):
        raise TypeError(f"color_for_id: expected an integer id, got {instance_id!r}")
    r, g, b = PALETTE[int(instance_id) % len(PALETTE)]
    return int(r), int(g), int(b)


def colors_for_ids(ids: Iterable[int]) -> np.ndarray:
    """Colours of several ids. ids: N integers. Returns (N, 3) uint8 RGB."""
    rows = [color_for_id(i) for i in ids]
    return np.array(rows, dtype=np.uint8).reshape(len(rows), 3)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected an (H, W, 3) uint8 RGB array, got shape {image.shape} "
                         f"dtype {image.dtype}")
    return image


def _check_colors(colors, n: int, name: str = "colors") -> np.ndarray:
    colors = np.asarray(colors)
    if colors.shape != (n, 3):
        raise ValueError(f"{name}: expected ({n}, 3) RGB values for {n} instances, got shape {colors.shape}")
    if not np.issubdtype(colors.dtype, np.integer) or colors.min(initial=0) < 0 or colors.max(initial=0) > 255:
        raise ValueError(f"{name}: expected integer RGB values in 0..255, got dtype {colors.dtype} "
                         f"range [{colors.min(initial=0)}, {colors.max(initial=0)}]")
    return colors.astype(np.uint8)


def overlay_masks(image: np.ndarray, masks: np.ndarray, colors, alpha: float = 0.5) -> np.ndarray:
    """Blend coloured masks into an image.

    image: (H, W, 3) uint8 RGB. masks: (N, H, W) bool, later masks lie on top of earlier ones.
    colors: (N, 3) integer RGB in 0..255. alpha: colour weight in [0, 1].
    Returns a new (H, W, 3) uint8 image where every pixel covered by a mask becomes
    round_half_up((1 - alpha) * pixel + alpha * colour) of its topmost mask, other pixels unchanged.
    Each pixel is blended once, with its topmost mask only, so overlapping instances stay as saturated
    as isolated ones instead of turning muddy.
    """
    image = _check_image(image)
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks: expected (N, {image.shape[0]}, {image.shape[1]}) to match the image, "
                         f"got shape {masks.shape}")
    if masks.dtype != np.bool_:
        raise TypeError(f"masks: expected dtype bool (threshold probabilities first), got {masks.dtype}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
    colors = _check_colors(colors, masks.shape[0])
    if masks.shape[0] == 0:
        return image.copy()
    covered = masks.any(axis=0)
    # argmax over the reversed stack finds the last (topmost) mask covering each pixel.
    top = masks.shape[0] - 1 - np.argmax(masks[::-1], axis=0)
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * colors[top].astype(np.float64)
    blended = np.floor(blended + 0.5).clip(0, 255).astype(np.uint8)
    return np.where(covered[..., None], blended, image)


def _text_color(rgb: np.ndarray) -> str:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return "black" if luminance > 140 else "white"


def _num_instances(masks, boxes_xywh, texts) -> int:
    counts = {name: len(v) for name, v in (("masks", masks), ("boxes_xywh", boxes_xywh), ("texts", texts))
              if v is not None}
    if len(set(counts.values())) > 1:
        raise ValueError(f"draw_instances: masks, boxes and texts must describe the same instances, got "
                         f"counts {counts}")
    return next(iter(counts.values()), 0)


def draw_instances(
    ax: Axes,
    image: np.ndarray,
    masks: np.ndarray | None = None,
    boxes_xywh: np.ndarray | None = None,
    texts: Sequence[str] | None = None,
    colors=None,
    *,
    alpha: float = 0.5,
    linewidth: float = 1.5,
    fontsize: float = 7.0,
    dashed: Sequence[bool] | None = None,
) -> Axes:
    """Draw an image with instance masks, box outlines and labels on a given Axes.

    image: (H, W, 3) uint8 RGB. masks: (N, H, W) bool or None. boxes_xywh: (N, 4) pixel x, y, w, h
    (COCO convention: x, y is the top-left corner of the top-left pixel) or None; rows of NaN are
    skipped. texts: N strings or None (empty strings are skipped); a text sits at its box's top-left
    corner, or at the top-left of its mask when there is no box. colors: (N, 3) uint8 RGB, default the
    palette by position. dashed: N flags drawing that box dashed (e.g. a temporal reference).
    Returns ax, with its axis lines and ticks hidden.
    """
    image = _check_image(image)
    n = _num_instances(masks, boxes_xywh, texts)
    colors = colors_for_ids(range(n)) if colors is None else _check_colors(colors, n)
    shown = overlay_masks(image, masks, colors, alpha) if masks is not None else image
    ax.imshow(shown, interpolation="nearest")
    if boxes_xywh is not None:
        boxes_xywh = np.asarray(boxes_xywh, dtype=np.float64).reshape(n, 4)
    # Label height in image pixels: font size (points) -> screen pixels -> image pixels.
    axes_height_px = max(ax.get_window_extent().height, 1.0)
    label_height = 1.4 * fontsize * ax.figure.dpi / 72.0 * image.shape[0] / axes_height_px
    for i in range(n):
        rgb = colors[i] / 255.0
        corner = None
        if boxes_xywh is not None and np.all(np.isfinite(boxes_xywh[i])):
            x, y, w, h = boxes_xywh[i]
            # imshow puts pixel centres on integers, so a pixel's top-left corner is at -0.5.
            corner = (x - 0.5, y - 0.5)
            style = "--" if dashed is not None and dashed[i] else "-"
            ax.add_patch(Rectangle(corner, w, h, fill=False, edgecolor=rgb, linewidth=linewidth,
                                   linestyle=style))
        if texts is None or not texts[i]:
            continue
        if corner is None and masks is not None and masks[i].any():
            rows, cols = np.nonzero(masks[i])
            corner = (cols.min() - 0.5, rows.min() - 0.5)
        if corner is None:
            continue
        # Labels sit above their box, unless that would push them out of the picture.
        above = corner[1] + 0.5 >= label_height
        ax.text(corner[0], corner[1], texts[i], fontsize=fontsize, color=_text_color(colors[i]),
                va="bottom" if above else "top", ha="left", clip_on=True,
                bbox=dict(facecolor=rgb, edgecolor="none", pad=1.0, alpha=0.85))
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(image.shape[0] - 0.5, -0.5)
    ax.set_axis_off()
    return ax


@dataclass(frozen=True)
class Overlay:
    """What to draw on one frame: N instances, ready for draw_instances(**overlay.drawing())."""

    ids: tuple[int, ...]      # (N,) instance / annotation / track ids
    masks: np.ndarray         # (N, H, W) bool
    boxes_xywh: np.ndarray    # (N, 4) pixel x, y, w, h
    texts: list[str]          # N labels
    colors: np.ndarray        # (N, 3) uint8 RGB

    def drawing(self) -> dict:
        """Keyword arguments for draw_instances / render_frame_png."""
        return dict(masks=self.masks, boxes_xywh=self.boxes_xywh, texts=self.texts, colors=self.colors)


def gt_overlay(index, video_id: int, t: int, visible: Iterable[int] | None = None) -> Overlay:
    """Ground-truth instances of frame t of a video, coloured by annotation id.

    index: a devis_core.data.ytvis_format.VideoIndex. visible: annotation ids to keep (None: all).
    Returns an Overlay with the instances present on that frame (in annotation order), labelled
    "<category name> #<ann id>".
    """
    keep = None if visible is None else set(visible)
    instances = [inst for inst in index.instances(video_id, t) if keep is None or inst.ann_id in keep]
    ids = tuple(int(inst.ann_id) for inst in instances)
    if instances:
        masks = np.stack([np.asarray(inst.mask, dtype=bool) for inst in instances])
    else:
        video = next(v for v in index.videos if v["id"] == video_id)
        height, width = int(video["height"]), int(video["width"])
        masks = np.zeros((0, height, width), dtype=bool)
    boxes = np.array([inst.box for inst in instances], dtype=np.float64).reshape(len(instances), 4)
    texts = [f"{index.categories.get(inst.category_id, inst.category_id)} #{inst.ann_id}"
             for inst in instances]
    return Overlay(ids=ids, masks=masks, boxes_xywh=boxes, texts=texts, colors=colors_for_ids(ids))


def _spread_frames(num_frames: int, count: int) -> list[int]:
    """Up to `count` frame indices spread evenly over 0..num_frames-1 (first and last included)."""
    if num_frames <= 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(0, num_frames - 1, min(count, num_frames))})


def plot_video_grid(
    index,
    video_ids: Sequence[int] | None = None,
    frames_per_video: int = 4,
    *,
    num_videos: int = 3,
    alpha: float = 0.5,
    show_boxes: bool = True,
    show_texts: bool = True,
    panel_width: float = 2.4,
) -> Figure:
    """A grid of ground-truth frames, one row per video, frames spread evenly over each video.

    index: a VideoIndex. video_ids: the videos to show (None: the first num_videos of the index).
    frames_per_video: columns. Returns a matplotlib Figure with len(video_ids) x frames_per_video
    Axes; panels beyond a short video's length are left blank. Each panel is titled "video <id> · t=<t>".
    """
    if video_ids is None:
        video_ids = index.video_ids()[:num_videos]
    video_ids = list(video_ids)
    if not video_ids:
        raise ValueError("plot_video_grid: no videos to show (empty video_ids or empty index)")
    if frames_per_video < 1:
        raise ValueError(f"plot_video_grid: frames_per_video must be >= 1, got {frames_per_video}")
    known = set(index.video_ids())
    unknown = [v for v in video_ids if v not in known]
    if unknown:
        raise KeyError(f"plot_video_grid: video ids {unknown} are not in {index.ann_file}")
    first = index.load_frame(video_ids[0], 0)
    aspect = first.shape[0] / first.shape[1]
    fig = Figure(figsize=(panel_width * frames_per_video, panel_width * aspect * len(video_ids) + 0.3),
                 layout="constrained")
    axes = fig.subplots(len(video_ids), frames_per_video, squeeze=False)
    for row, video_id in zip(axes, video_ids):
        frames = _spread_frames(index.num_frames(video_id), frames_per_video)
        for col, ax in enumerate(row):
            if col >= len(frames):
                ax.set_axis_off()
                continue
            t = frames[col]
            overlay = gt_overlay(index, video_id, t)
            drawing = overlay.drawing()
            if not show_boxes:
                drawing["boxes_xywh"] = None
            if not show_texts:
                drawing["texts"] = None
            draw_instances(ax, index.load_frame(video_id, t), alpha=alpha, fontsize=6, **drawing)
            ax.set_title(f"video {video_id} · t={t}", fontsize=8)
    return fig


def figure_to_png(fig: Figure, dpi: float | None = None) -> bytes:
    """Render a Figure to PNG bytes (Agg, no pyplot); the PNG carries no software/date metadata."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi if dpi is not None else fig.dpi,
                metadata={"Software": None})
    return buffer.getvalue()


def render_frame_png(
    image: np.ndarray,
    masks: np.ndarray | None = None,
    boxes_xywh: np.ndarray | None = None,
    texts: Sequence[str] | None = None,
    colors=None,
    *,
    alpha: float = 0.5,
    scale: float = 2.0,
    fontsize: float = 7.0,
) -> bytes:
    """One frame with its instances as PNG bytes of (scale*H, scale*W) pixels, no margins.

    image: (H, W, 3) uint8 RGB; masks, boxes_xywh, texts, colors as in draw_instances.
    scale > 1 gives labels and box lines room on small frames.
    """
    image = _check_image(image)
    if scale <= 0:
        raise ValueError(f"render_frame_png: scale must be > 0, got {scale}")
    dpi = 100.0
    height, width = image.shape[:2]
    fig = Figure(figsize=(width * scale / dpi, height * scale / dpi), dpi=dpi)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    draw_instances(ax, image, masks, boxes_xywh, texts, colors, alpha=alpha, fontsize=fontsize)
    return figure_to_png(fig)
