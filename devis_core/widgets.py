"""ipywidgets browsers over a video dataset: pick a video, scrub or play its frames, toggle instances."""

from __future__ import annotations

import html
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable

import ipywidgets as widgets

from devis_core.visualize import color_for_id, gt_overlay, render_frame_png


@dataclass(frozen=True)
class Shown:
    """What the browser's image currently shows."""

    video_id: int
    frame: int
    ann_ids: tuple[int, ...]   # annotation ids drawn on that frame (ticked and present), in annotation order


class VideoBrowser:
    """Browse the frames of a VideoIndex with their ground-truth masks, boxes and labels.

    index: a devis_core.data.ytvis_format.VideoIndex. instance_ids: annotation ids ticked when a video
    is first shown (None: all); the other instances get unticked toggles. video_id: the video shown
    first (default: the first of the index). scale: PNG pixels per frame pixel. alpha: mask colour
    weight. interval_ms: Play speed.

    Controls: `.video` (Dropdown), `.frame` (IntSlider), `.play` (Play, linked to the slider),
    `.toggles` (ann id -> Checkbox, rebuilt when the video changes), `.image` (the picture);
    `.widget` is the assembled VBox to display, `.shown` a Shown record of the current picture.
    Changing any control redraws. Tick choices are remembered per annotation id across video switches.
    """

    def __init__(self, index, *, instance_ids: Iterable[int] | None = None, video_id: int | None = None,
                 scale: float = 2.0, alpha: float = 0.5, interval_ms: int = 200):
        video_ids = index.video_ids()
        if not video_ids:
            raise ValueError(f"VideoBrowser: {index.ann_file} has no videos")
        if video_id is None:
            video_id = video_ids[0]
        elif video_id not in video_ids:
            raise KeyError(f"VideoBrowser: video id {video_id} is not in {index.ann_file}")
        self.index = index
        self.scale = scale
        self.alpha = alpha
        self._default_ids = None if instance_ids is None else {int(i) for i in instance_ids}
        self._ticked: dict[int, bool] = {}
        self._holding = False
        self.shown: Shown | None = None

        self.video = widgets.Dropdown(options=[(self._video_label(v), v) for v in video_ids],
                                      value=video_id, description="video")
        self.frame = widgets.IntSlider(value=0, min=0, max=0, description="frame", continuous_update=True)
        self.play = widgets.Play(value=0, min=0, max=0, step=1, interval=interval_ms, description="play")
        # A kernel-side link rather than jslink: every frame is rendered in the kernel, so each Play tick
        # has to reach Python anyway, and the link also keeps both in step when driven from code.
        widgets.link((self.play, "value"), (self.frame, "value"))
        self.toggles: dict[int, widgets.Checkbox] = {}
        self._toggle_box = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.image = widgets.Image(format="png")
        self.status = widgets.HTML()
        self.widget = widgets.VBox([
            widgets.HBox([self.video, self.play, self.frame]),
            self._toggle_box,
            self.image,
            self.status,
        ])

        self.video.observe(self._on_video, names="value")
        self.frame.observe(self._on_change, names="value")
        self._show_video(video_id)

    def _video_label(self, video_id: int) -> str:
        record = next((v for v in self.index.videos if v["id"] == video_id), {})
        names = record.get("file_names") or []
        folder = names[0].split("/")[0] if names else ""
        return f"{video_id}: {folder} ({self.index.num_frames(video_id)} frames)"

    @contextmanager
    def _hold(self):
        """Suppress redraws while several controls change together."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False

    def _show_video(self, video_id: int) -> None:
        last = self.index.num_frames(video_id) - 1
        with self._hold():
            # Lower the value before the max so the slider never clamps to a frame of the old video.
            self.frame.value = 0
            self.frame.max = last
            self.play.max = last
            self._build_toggles(video_id)
        self.redraw()

    def _build_toggles(self, video_id: int) -> None:
        for box in self.toggles.values():
            box.unobserve(self._on_toggle, names="value")
        self.toggles = {}
        rows = []
        for record in self.index.annotations(video_id):
            ann_id = int(record["id"])
            default = self._default_ids is None or ann_id in self._default_ids
            name = self.index.categories.get(record["category_id"], record["category_id"])
            box = widgets.Checkbox(value=self._ticked.get(ann_id, default), description=f"{name} #{ann_id}",
                                   indent=False, layout=widgets.Layout(width="auto"))
            box.observe(self._on_toggle, names="value")
            r, g, b = color_for_id(ann_id)
            swatch = widgets.HTML(f'<span style="display:inline-block;width:12px;height:12px;'
                                  f'background:rgb({r},{g},{b});margin-top:9px"></span>')
            rows.append(widgets.HBox([swatch, box], layout=widgets.Layout(margin="0 12px 0 0")))
            self.toggles[ann_id] = box
        self._toggle_box.children = tuple(rows)

    def _on_video(self, change) -> None:
        self._show_video(change["new"])

    def _on_toggle(self, change) -> None:
        for ann_id, box in self.toggles.items():
            if box is change["owner"]:
                self._ticked[ann_id] = bool(change["new"])
        self._on_change(change)

    def _on_change(self, _change) -> None:
        if not self._holding:
            self.redraw()

    def visible_ids(self) -> list[int]:
        """Annotation ids of the current video whose toggle is ticked."""
        return [ann_id for ann_id, box in self.toggles.items() if box.value]

    def redraw(self) -> None:
        """Render the current frame with the ticked instances into `.image` and update `.shown`."""
        video_id, t = self.video.value, self.frame.value
        overlay = gt_overlay(self.index, video_id, t, visible=self.visible_ids())
        image = self.index.load_frame(video_id, t)
        self.image.value = render_frame_png(image, alpha=self.alpha, scale=self.scale, **overlay.drawing())
        self.shown = Shown(video_id=video_id, frame=t, ann_ids=overlay.ids)
        names = ", ".join(html.escape(text) for text in overlay.texts) or "none"
        self.status.value = (f"video {video_id} · frame {t + 1}/{self.frame.max + 1} · "
                             f"{len(overlay.ids)} instance(s) drawn: {names}")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
