"""ipywidgets browsers: ground truth and inference results of videos (pick a video, scrub or play its
frames, toggle instances / tracks) and an explorer of DeVIS decoder attention maps."""

from __future__ import annotations

import html
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import ipywidgets as widgets
import numpy as np

from devis_core.result_viz import track_label, track_overlay
from devis_core.results import check_entry
from devis_core.visualize import color_for_id, figure_to_png, gt_overlay, render_frame_png


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


# --------------------------------------------------------------------------------------------------
# inference results


@dataclass(frozen=True)
class ResultsShown:
    """What the results browser's image currently shows."""

    video_id: int
    frame: int
    track_ids: tuple[int, ...]   # tracks drawn (ticked, score >= threshold, a mask on that frame), ascending
    score_threshold: float


class _FrameSource:
    """Frames of videos from a VideoIndex, a mapping video id -> frames, or a callable video id -> frames."""

    def __init__(self, source, entry_video_ids: list[int]):
        self.index = source if hasattr(source, "load_frame") and hasattr(source, "video_ids") else None
        self._frames: dict[int, list] = {}
        if self.index is not None:
            self.video_ids = list(self.index.video_ids())
            self.categories = dict(self.index.categories)
            self._load = None
        elif isinstance(source, Mapping):
            self.video_ids = [int(v) for v in source]
            self.categories = {}
            self._load = lambda video_id: source[video_id]
        elif callable(source):
            self.video_ids = list(dict.fromkeys(entry_video_ids))
            self.categories = {}
            self._load = source
        else:
            raise TypeError(f"ResultsBrowser: frames source must be a VideoIndex, a mapping video id -> frames or "
                            f"a callable video id -> frames, got {type(source).__name__}")

    def frames(self, video_id: int) -> list:
        # One video's frames are kept at a time: browsing a video reads each frame many times.
        if video_id not in self._frames:
            frames = list(self._load(video_id))
            if not frames:
                raise ValueError(f"ResultsBrowser: the frames source returned no frames for video {video_id}")
            self._frames = {video_id: frames}
        return self._frames[video_id]

    def num_frames(self, video_id: int) -> int:
        return self.index.num_frames(video_id) if self.index is not None else len(self.frames(video_id))

    def frame(self, video_id: int, t: int) -> np.ndarray:
        return self.index.load_frame(video_id, t) if self.index is not None else np.asarray(self.frames(video_id)[t])


class ResultsBrowser:
    """Browse inference results: pick a video, scrub or play it, toggle tracks, filter by score.

    source: a VideoIndex, a mapping video id -> list of (H, W, 3) uint8 RGB frames, or a callable
    video id -> such a list (the videos are then those of ``entries``). entries: YouTube-VIS result
    entries (``devis_core.results.read_results``); track k of a video is its k-th entry, coloured
    ``color_for_id(k)`` as in ``devis_core.result_viz``. score_threshold: tracks scoring below it are
    hidden (their toggles disabled). max_videos: keep the first videos only. category_names: id -> name
    (default: the VideoIndex's categories).

    Controls: `.video`, `.frame` + `.play`, `.threshold` (FloatSlider), `.toggles` (track k -> Checkbox,
    rebuilt per video; tick choices remembered per (video, track)), `.image`; `.widget` is the VBox to
    display and `.shown` a ResultsShown record of the current picture.
    """

    def __init__(self, source, entries: Sequence[dict], *, video_id: int | None = None, score_threshold: float = 0.0,
                 max_videos: int | None = None, category_names: Mapping[int, str] | None = None,
                 scale: float = 2.0, alpha: float = 0.5, interval_ms: int = 200):
        for i, entry in enumerate(entries):
            check_entry(entry, f"ResultsBrowser: entries[{i}]")
        self.source = _FrameSource(source, [int(e["video_id"]) for e in entries])
        video_ids = self.source.video_ids[:max_videos] if max_videos is not None else self.source.video_ids
        if not video_ids:
            raise ValueError("ResultsBrowser: no videos to browse (empty frames source or results)")
        if video_id is None:
            video_id = video_ids[0]
        elif video_id not in video_ids:
            raise KeyError(f"ResultsBrowser: video id {video_id} is not among the browsable videos {video_ids}")
        self.entries_by_video: dict[int, list[dict]] = {}
        for entry in entries:
            self.entries_by_video.setdefault(int(entry["video_id"]), []).append(entry)
        self.category_names = dict(category_names) if category_names is not None else self.source.categories
        self.scale, self.alpha = scale, alpha
        self._ticked: dict[tuple[int, int], bool] = {}
        self._holding = False
        self.shown: ResultsShown | None = None

        self.video = widgets.Dropdown(options=[(self._video_label(v), v) for v in video_ids], value=video_id,
                                      description="video")
        self.frame = widgets.IntSlider(value=0, min=0, max=0, description="frame")
        self.play = widgets.Play(value=0, min=0, max=0, step=1, interval=interval_ms, description="play")
        widgets.link((self.play, "value"), (self.frame, "value"))
        self.threshold = widgets.FloatSlider(value=float(score_threshold), min=0.0, max=1.0, step=0.01,
                                             description="min score", readout_format=".2f")
        self.toggles: dict[int, widgets.Checkbox] = {}
        self._toggle_box = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.image = widgets.Image(format="png")
        self.status = widgets.HTML()
        self.widget = widgets.VBox([widgets.HBox([self.video, self.play, self.frame]), self.threshold,
                                    self._toggle_box, self.image, self.status])
        self.video.observe(self._on_video, names="value")
        self.frame.observe(self._on_change, names="value")
        self.threshold.observe(self._on_threshold, names="value")
        self._show_video(video_id)

    def _video_label(self, video_id: int) -> str:
        n = len(self.entries_by_video.get(video_id, []))
        return f"{video_id} ({n} track{'s' if n != 1 else ''})"

    @contextmanager
    def _hold(self):
        self._holding = True
        try:
            yield
        finally:
            self._holding = False

    def _entries(self) -> list[dict]:
        return self.entries_by_video.get(self.video.value, [])

    def _show_video(self, video_id: int) -> None:
        last = self.source.num_frames(video_id) - 1
        entries = self.entries_by_video.get(video_id, [])
        bad = [k for k, e in enumerate(entries) if len(e["segmentations"]) != last + 1]
        if bad:
            raise ValueError(f"ResultsBrowser: video {video_id} has {last + 1} frames but its track(s) {bad} have "
                             f"{[len(entries[k]['segmentations']) for k in bad]} segmentations")
        with self._hold():
            self.frame.value = 0
            self.frame.max = last
            self.play.max = last
            self._build_toggles(video_id)
        self.redraw()

    def _build_toggles(self, video_id: int) -> None:
        for box in self.toggles.values():
            box.unobserve(self._on_toggle, names="value")
        self.toggles, rows = {}, []
        for k, entry in enumerate(self.entries_by_video.get(video_id, [])):
            label = track_label(entry["category_id"], entry["score"], self.category_names)
            box = widgets.Checkbox(value=self._ticked.get((video_id, k), True), indent=False,
                                   description=f"{k}: {label}", layout=widgets.Layout(width="auto"))
            box.observe(self._on_toggle, names="value")
            r, g, b = color_for_id(k)
            swatch = widgets.HTML(f'<span style="display:inline-block;width:12px;height:12px;'
                                  f'background:rgb({r},{g},{b});margin-top:9px"></span>')
            rows.append(widgets.HBox([swatch, box], layout=widgets.Layout(margin="0 12px 0 0")))
            self.toggles[k] = box
        self._toggle_box.children = tuple(rows)
        self._update_disabled()

    def _update_disabled(self) -> None:
        for k, box in self.toggles.items():
            box.disabled = self._entries()[k]["score"] < self.threshold.value

    def _on_video(self, change) -> None:
        self._show_video(change["new"])

    def _on_toggle(self, change) -> None:
        for k, box in self.toggles.items():
            if box is change["owner"]:
                self._ticked[(self.video.value, k)] = bool(change["new"])
        self._on_change(change)

    def _on_threshold(self, change) -> None:
        self._update_disabled()
        self._on_change(change)

    def _on_change(self, _change) -> None:
        if not self._holding:
            self.redraw()

    def visible_tracks(self) -> list[int]:
        """Tracks of the current video that are ticked and reach the score threshold."""
        entries = self._entries()
        return [k for k, box in self.toggles.items() if box.value and entries[k]["score"] >= self.threshold.value]

    def redraw(self) -> None:
        """Render the current frame with the visible tracks into `.image` and update `.shown`."""
        video_id, t = self.video.value, self.frame.value
        image = self.source.frame(video_id, t)
        overlay = track_overlay(self._entries(), t, image.shape[:2], self.visible_tracks(), self.category_names)
        self.image.value = render_frame_png(image, alpha=self.alpha, scale=self.scale, **overlay.drawing())
        self.shown = ResultsShown(video_id=video_id, frame=t, track_ids=tuple(sorted(overlay.ids)),
                                  score_threshold=float(self.threshold.value))
        names = ", ".join(f"{k}: {html.escape(text)}" for k, text in sorted(zip(overlay.ids, overlay.texts))) or "none"
        self.status.value = (f"video {video_id} · frame {t + 1}/{self.frame.max + 1} · "
                             f"{len(overlay.ids)} track(s) drawn: {names}")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


# --------------------------------------------------------------------------------------------------
# decoder attention maps


@dataclass(frozen=True)
class AttentionShown:
    """What the attention explorer's image currently shows."""

    layer: int
    track: int
    slot: int
    frame: int                          # query frame
    level: str | int                    # 'merged' or a level index
    head: str | int                     # 'all' or a head index
    frame_weights: tuple[float, ...]    # attention weight the query puts on each clip frame


class AttentionExplorer:
    """Explore decoder attention maps of one clip: track, query frame, layer, level (or merged), head.

    frames: the T clip frames (H, W, 3) uint8 RGB. attn: a ``devis_core.attention_maps.decoder_attention``
    dict, or a list of them (one per layer, from ``decoder_attention_layers``). category_names: id -> name.

    Controls: `.track` (the clip's top-k tracks), `.frame` (query frame), `.layer`, `.level`, `.head`,
    `.image`; `.widget` is the VBox to display and `.shown` an AttentionShown record of the picture.
    """

    def __init__(self, frames: Sequence[np.ndarray], attn, *, category_names: Mapping[int, str] | None = None,
                 panel_width: float = 2.8):
        layers = [attn] if isinstance(attn, Mapping) else list(attn)
        if not layers:
            raise ValueError("AttentionExplorer: no attention records given")
        self.by_layer = {int(a["layer"]): a for a in layers}
        self.frames = list(frames)
        self.category_names = dict(category_names or {})
        self.panel_width = panel_width
        self.shown: AttentionShown | None = None
        first = layers[0]
        topk = first["topk"]
        n_frames, _, n_heads, n_levels = first["weights"].shape[:4]
        tracks = []
        for k, slot in enumerate(topk["top_k_idxs"].tolist()):
            cat = int(topk["labels"][0, k])
            label = track_label(cat, float(topk["scores"][:, k].mean()), self.category_names)
            tracks.append((f"{k}: slot {slot} · {label}", k))
        self.track = widgets.Dropdown(options=tracks, value=0, description="track")
        self.frame = widgets.IntSlider(value=0, min=0, max=n_frames - 1, description="query frame")
        self.layer = widgets.Dropdown(options=sorted(self.by_layer), value=int(layers[-1]["layer"]),
                                      description="layer")
        self.level = widgets.Dropdown(options=["merged"] + list(range(n_levels)), value="merged", description="level")
        self.head = widgets.Dropdown(options=["all"] + list(range(n_heads)), value="all", description="head")
        self.image = widgets.Image(format="png")
        self.status = widgets.HTML()
        self.widget = widgets.VBox([widgets.HBox([self.track, self.frame]),
                                    widgets.HBox([self.layer, self.level, self.head]), self.image, self.status])
        for control in (self.track, self.frame, self.layer, self.level, self.head):
            control.observe(self._on_change, names="value")
        self.redraw()

    def _on_change(self, _change) -> None:
        self.redraw()

    def redraw(self) -> None:
        """Draw the selected query's sampling points into `.image` and update `.shown`."""
        # Imported here so the dataset browsers do not pull in torch and the models.
        from devis_core.attention_maps import attention_points, plot_attention_map, track_slot

        attn = self.by_layer[self.layer.value]
        track, frame, level, head = self.track.value, self.frame.value, self.level.value, self.head.value
        slot = track_slot(attn, track)
        fig = plot_attention_map(self.frames, attn, track=track, frame=frame, level=level, head=head,
                                 category_names=self.category_names, panel_width=self.panel_width)
        self.image.value = figure_to_png(fig)
        sums = tuple(float(w.sum()) for _, w in attention_points(attn, slot, frame, level, head))
        self.shown = AttentionShown(layer=int(attn["layer"]), track=track, slot=slot, frame=frame, level=level,
                                    head=head, frame_weights=sums)
        shares = " · ".join(f"t={t}: {s:.3f}" for t, s in enumerate(sums))
        self.status.value = f"layer {attn['layer']} · track {track} (slot {slot}) · weights per frame: {shares}"

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
