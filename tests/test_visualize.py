"""Tests for devis_core/visualize.py: blending arithmetic, colours, RGB order, figures."""

import io

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from devis_core.data.ytvis_format import Instance
from devis_core.visualize import (
    PALETTE,
    color_for_id,
    colors_for_ids,
    draw_instances,
    figure_to_png,
    gt_overlay,
    overlay_masks,
    plot_video_grid,
    render_frame_png,
)

BASE = (100, 50, 200)
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _four_by_four():
    """A flat 4x4 image and two overlapping masks: A = rows/cols 0..1, B = rows/cols 1..2."""
    image = np.empty((4, 4, 3), dtype=np.uint8)
    image[:] = BASE
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0:2, 0:2] = True
    masks[1, 1:3, 1:3] = True
    return image, masks


def test_overlay_exact_pixels_half_alpha():
    image, masks = _four_by_four()
    out = overlay_masks(image, masks, [RED, BLUE], alpha=0.5)
    # By hand: 0.5*100 + 0.5*255 = 177.5 -> 178 (half rounds up), 0.5*50 = 25, 0.5*200 = 100.
    assert out[0, 0].tolist() == [178, 25, 100]
    assert out[0, 1].tolist() == [178, 25, 100]
    # (1, 1) is covered by both: only the topmost (B, blue) counts: 50, 25, 0.5*200 + 0.5*255 = 227.5 -> 228.
    assert out[1, 1].tolist() == [50, 25, 228]
    assert out[2, 2].tolist() == [50, 25, 228]
    assert out[3, 3].tolist() == list(BASE)
    assert out[0, 3].tolist() == list(BASE)
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    # The input is not modified.
    assert (image == np.array(BASE, dtype=np.uint8)).all()


def test_overlay_exact_pixels_quarter_alpha_and_limits():
    image, masks = _four_by_four()
    out = overlay_masks(image, masks, [RED, BLUE], alpha=0.25)
    # 0.75*100 + 0.25*255 = 138.75 -> 139; 0.75*50 = 37.5 -> 38; 0.75*200 = 150.
    assert out[0, 0].tolist() == [139, 38, 150]
    # 0.75*100 = 75; 37.5 -> 38; 150 + 63.75 = 213.75 -> 214.
    assert out[2, 1].tolist() == [75, 38, 214]
    assert (overlay_masks(image, masks, [RED, BLUE], alpha=0.0) == image).all()
    full = overlay_masks(image, masks, [RED, BLUE], alpha=1.0)
    assert full[0, 0].tolist() == list(RED) and full[1, 1].tolist() == list(BLUE)
    assert full[3, 0].tolist() == list(BASE)


def test_overlay_count_of_changed_pixels_and_empty_masks():
    image, masks = _four_by_four()
    out = overlay_masks(image, masks, [RED, BLUE], alpha=0.5)
    changed = (out != image).any(axis=2)
    assert changed.sum() == (masks[0] | masks[1]).sum() == 7
    none = overlay_masks(image, np.zeros((0, 4, 4), dtype=bool), np.zeros((0, 3), dtype=np.uint8))
    assert (none == image).all()


def test_overlay_rejects_bad_input():
    image, masks = _four_by_four()
    with pytest.raises(ValueError, match="masks"):
        overlay_masks(image, masks[:, :3], [RED, BLUE])
    with pytest.raises(TypeError, match="bool"):
        overlay_masks(image, masks.astype(np.float32), [RED, BLUE])
    with pytest.raises(ValueError, match="colors"):
        overlay_masks(image, masks, [RED])
    with pytest.raises(ValueError, match="alpha"):
        overlay_masks(image, masks, [RED, BLUE], alpha=1.5)
    with pytest.raises(ValueError, match="image"):
        overlay_masks(image.astype(np.float32), masks, [RED, BLUE])


def test_colors_stable_distinct_and_wrapping():
    n = len(PALETTE)
    first = [color_for_id(i) for i in range(n)]
    assert len(set(first)) == n
    assert [color_for_id(i) for i in range(n)] == first
    assert color_for_id(7) == color_for_id(7 + n) == color_for_id(7 + 5 * n)
    assert color_for_id(np.int64(3)) == color_for_id(3)
    # Distinguishable: every pair of palette entries is far apart in RGB.
    p = PALETTE.astype(float)
    dist = np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1)) + np.eye(n) * 1e9
    assert dist.min() > 60
    ids = [4, 9, 4, 123]
    table = colors_for_ids(ids)
    assert table.shape == (4, 3) and table.dtype == np.uint8
    assert (table[0] == table[2]).all() and tuple(table[3]) == color_for_id(123)
    with pytest.raises(TypeError):
        color_for_id(1.5)


def _decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def test_rgb_order_preserved_through_png():
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    image[:, :2] = RED
    image[:, 2:] = (0, 255, 0)
    png = render_frame_png(image, scale=8)
    pixels = _decode_png(png)
    assert pixels.shape == (32, 32, 3)
    left, right = pixels[16, 4].astype(int), pixels[16, 28].astype(int)
    assert left[0] > 200 and left[1] < 40 and left[2] < 40
    assert right[1] > 200 and right[0] < 40 and right[2] < 40
    # A blue mask over the red half: the result is red + blue, never green (no channel swap).
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, :, :2] = True
    blended = _decode_png(render_frame_png(image, masks, colors=[BLUE], alpha=0.5, scale=8))
    r, g, b = blended[16, 4].astype(int)
    assert abs(r - 128) <= 3 and g < 10 and abs(b - 128) <= 3


def test_draw_instances_boxes_texts_colours():
    image, masks = _four_by_four()
    boxes = np.array([[0, 0, 2, 2], [np.nan] * 4])
    fig = Figure(figsize=(2, 2))
    ax = fig.add_axes((0, 0, 1, 1))
    draw_instances(ax, image, masks, boxes, ["a", "b"], [RED, BLUE], alpha=0.5)
    rects = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(rects) == 1  # the NaN box is skipped
    assert rects[0].get_xy() == (-0.5, -0.5) and rects[0].get_width() == 2
    assert tuple(rects[0].get_edgecolor()[:3]) == (1.0, 0.0, 0.0)
    texts = {t.get_text(): t.get_position() for t in ax.texts}
    # "b" has no box, so it sits at its mask's top-left pixel corner (col 1, row 1).
    assert texts == {"a": (-0.5, -0.5), "b": (0.5, 0.5)}
    # Box "a" touches the top edge, so its label goes inside the box rather than off the picture.
    assert {t.get_text(): t.get_va() for t in ax.texts}["a"] == "top"
    shown = ax.images[0].get_array()
    assert np.asarray(shown)[1, 1].tolist() == [50, 25, 228]
    with pytest.raises(ValueError, match="same instances"):
        draw_instances(ax, image, masks, boxes[:1], ["a", "b"])


class _TinyIndex:
    """Just the VideoIndex surface the drawing code uses, over hand-made frames."""

    def __init__(self, lengths):
        self.ann_file = "tiny.json"
        self.categories = {1: "disc", 2: "square"}
        self.videos = [{"id": vid, "height": 6, "width": 8, "file_names": [f"v{vid}/{t}.jpg" for t in range(n)]}
                       for vid, n in lengths.items()]
        self._lengths = lengths

    def video_ids(self):
        return list(self._lengths)

    def num_frames(self, vid):
        return self._lengths[vid]

    def load_frame(self, vid, t):
        frame = np.zeros((6, 8, 3), dtype=np.uint8)
        frame[..., 0] = 10 * t
        return frame

    def instances(self, vid, t):
        mask = np.zeros((6, 8), dtype=bool)
        mask[1:3, t % 6: t % 6 + 2] = True
        other = np.zeros((6, 8), dtype=bool)
        other[4:6, 0:3] = True
        return [Instance(vid * 10 + 1, 1, mask, (float(t % 6), 1.0, 2.0, 2.0), 4.0, 0),
                Instance(vid * 10 + 2, 2, other, (0.0, 4.0, 3.0, 2.0), 6.0, 0)]


def test_gt_overlay_filters_and_labels():
    index = _TinyIndex({3: 4})
    overlay = gt_overlay(index, 3, 1)
    assert overlay.ids == (31, 32)
    assert overlay.texts == ["disc #31", "square #32"]
    assert overlay.masks.shape == (2, 6, 8) and overlay.boxes_xywh.tolist()[0] == [1.0, 1.0, 2.0, 2.0]
    assert (overlay.colors == colors_for_ids([31, 32])).all()
    only = gt_overlay(index, 3, 1, visible=[32])
    assert only.ids == (32,) and only.masks.shape == (1, 6, 8)
    empty = gt_overlay(index, 3, 1, visible=[])
    assert empty.ids == () and empty.masks.shape == (0, 6, 8)


def test_plot_video_grid_axes_and_titles():
    index = _TinyIndex({10: 5, 11: 2, 12: 4})
    fig = plot_video_grid(index, [10, 11, 12], frames_per_video=3)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 9
    titles = [ax.get_title() for ax in fig.axes]
    # 5 frames spread over 3 columns: 0, 2, 4; the 2-frame video leaves its last panel blank.
    assert titles[:3] == ["video 10 · t=0", "video 10 · t=2", "video 10 · t=4"]
    assert titles[3:6] == ["video 11 · t=0", "video 11 · t=1", ""]
    assert len(fig.axes[5].images) == 0 and len(fig.axes[4].images) == 1
    # Each drawn panel holds one box per instance.
    assert all(len(ax.patches) == 2 for ax in fig.axes if ax.images)
    png = figure_to_png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(plot_video_grid(index, frames_per_video=2, num_videos=2).axes) == 4
    with pytest.raises(KeyError, match="99"):
        plot_video_grid(index, [10, 99])
