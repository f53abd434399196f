"""Training logs: tqdm progress bars, JSON-lines metrics, Visdom windows and the notebook's live curves."""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

METRICS_FILE = "metrics.jsonl"
# Windows drawn in Visdom and in the notebook: title -> record keys plotted in it.
CURVES: dict[str, tuple[str, ...]] = {
    "loss": ("train_loss", "val_loss"),
    "learning rate": ("lr",),
    "AP": ("AP", "bbox_AP", "segm_AP"),
}


def progress(iterable: Iterable, total: int | None, desc: str, enabled: bool = True):
    """tqdm bar over ``iterable`` (loss and rate are set by the caller through ``set_postfix``).

    Quiet when ``enabled`` is False (ranks other than 0) or stderr is not a terminal (batch jobs, papermill),
    where the JSON lines carry the numbers instead.
    """
    from tqdm.auto import tqdm

    quiet = (not enabled) or not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=quiet, dynamic_ncols=True, leave=False)


class JsonLinesLog:
    """Appends one JSON object per line to ``path`` (a log grows, so it is appended to, not rewritten;
    each record is one ``write`` followed by a flush, so a killed run leaves whole lines)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Mapping) -> None:
        """Append ``record`` (JSON-serialisable; NaN and infinities are written as null)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        line = json.dumps(clean, sort_keys=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()


def read_json_lines(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics file; a truncated last line (a run killed while writing) is ignored, any other
    unreadable line is an error naming the file and the line number."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines):
                break
            raise ValueError(f"{path}: line {i} is not valid JSON ({err.msg})") from err
    return out


class VisdomLog:
    """Line plots in a Visdom server (VISDOM_SERVER:VISDOM_PORT), one window per :data:`CURVES` entry.

    When the server cannot be reached, one warning is issued and logging to Visdom is switched off: a
    training run never fails because the dashboard is down.
    """

    def __init__(self, server: str, port: int, env: str, timeout_s: float = 3.0):
        self.env, self.enabled, self.windows = env, False, {}
        self.vis = None
        try:
            import visdom
        except ImportError as err:
            warnings.warn(f"VISDOM_ON is True but the visdom package is missing ({err}); not logging to Visdom",
                          stacklevel=2)
            return
        try:
            vis = visdom.Visdom(server=server, port=int(port), env=env, use_incoming_socket=False,
                                raise_exceptions=True)
            ok = vis.check_connection(timeout_seconds=timeout_s)
        except Exception as err:  # noqa: BLE001 - any connection failure means "no dashboard", reported below
            ok, reason = False, f"{type(err).__name__}: {err}"
        else:
            reason = "no answer"
        if not ok:
            warnings.warn(f"Visdom server {server}:{port} is not reachable ({reason}); training continues "
                          "without Visdom logging", stacklevel=2)
            return
        self.vis, self.enabled = vis, True

    def log(self, step: float, record: Mapping[str, float], xlabel: str = "epoch") -> None:
        """Add the values of ``record`` found in :data:`CURVES` at x = ``step``."""
        if not self.enabled:
            return
        import numpy as np

        for title, keys in CURVES.items():
            for key in keys:
                v = record.get(key)
                if v is None or not isinstance(v, (int, float)) or not math.isfinite(v):
                    continue
                win = self.windows.get(title)
                opts = {"title": title, "xlabel": xlabel, "showlegend": True}
                try:
                    if win is None:
                        self.windows[title] = self.vis.line(X=np.array([step]), Y=np.array([v]), name=key,
                                                            opts=opts, win=f"{self.env}_{title}")
                    else:
                        self.vis.line(X=np.array([step]), Y=np.array([v]), name=key, win=win, update="append")
                except Exception as err:  # noqa: BLE001 - a dashboard that went away must not stop training
                    warnings.warn(f"Visdom logging stopped: {type(err).__name__}: {err}", stacklevel=2)
                    self.enabled = False
                    return


class TrainingLog:
    """Where the engine sends numbers: the JSON-lines file, Visdom, and any callbacks (the notebook's live
    curves). Only rank 0 writes (``enabled``); other ranks get a no-op instance."""

    def __init__(self, output_dir: str | os.PathLike | None, enabled: bool = True, visdom: VisdomLog | None = None,
                 callbacks: Sequence[Callable[[dict], None]] = ()):
        self.enabled = enabled
        self.file = JsonLinesLog(Path(output_dir) / METRICS_FILE) if (enabled and output_dir) else None
        self.visdom = visdom if enabled else None
        self.callbacks = list(callbacks) if enabled else []

    def log(self, record: dict) -> None:
        """record: {'kind': 'train_iter' | 'train_epoch' | 'eval', 'epoch', 'iteration', metrics...}. A
        'time' entry (Unix seconds) is added, so time-to-accuracy can be read off the file across resumes."""
        if not self.enabled:
            return
        record = {**record, "time": round(time.time(), 3)} if "time" not in record else record
        if self.file is not None:
            self.file.write(record)
        if self.visdom is not None:
            step = record.get("epoch", 0) + record.get("epoch_fraction", 0.0)
            self.visdom.log(step, record)
        for cb in self.callbacks:
            cb(record)


def build_training_log(cfg, enabled: bool, callbacks: Sequence[Callable[[dict], None]] = ()) -> TrainingLog:
    """TrainingLog writing OUTPUT_DIR/metrics.jsonl, and Visdom when VISDOM_ON (VISDOM_SERVER, VISDOM_PORT;
    the environment is named after OUTPUT_DIR's folder)."""
    vis = None
    if enabled and cfg.VISDOM_ON:
        vis = VisdomLog(cfg.VISDOM_SERVER, cfg.VISDOM_PORT, env=Path(cfg.OUTPUT_DIR).name or "devis")
    return TrainingLog(cfg.OUTPUT_DIR, enabled, vis, callbacks)


def curves_from_records(records: Iterable[Mapping]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """Group records into plottable series: {window title: {key: (x (epochs, fractional), y)}}."""
    out: dict[str, dict[str, tuple[list[float], list[float]]]] = {t: {} for t in CURVES}
    for r in records:
        x = float(r.get("epoch", 0)) + float(r.get("epoch_fraction", 0.0))
        for title, keys in CURVES.items():
            for k in keys:
                v = r.get(k)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    xs, ys = out[title].setdefault(k, ([], []))
                    xs.append(x)
                    ys.append(float(v))
    return out


def plot_curves(records: Iterable[Mapping], fig=None):
    """Loss, learning rate and AP against epochs in one matplotlib figure (re-drawn into ``fig`` when
    given). Returns the figure."""
    import matplotlib.pyplot as plt

    series = curves_from_records(records)
    if fig is None:
        fig = plt.figure(figsize=(13, 3.4))
    fig.clf()
    axes = fig.subplots(1, len(CURVES))
    for ax, (title, lines) in zip(axes, series.items()):
        for key, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if title == "learning rate" and lines:
            ax.set_yscale("log")
        if lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no values yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


class LiveCurves:
    """Notebook display of :func:`plot_curves` that redraws in place as records arrive.

    Use ``LiveCurves().callback`` as a training-log callback (in-process training) or
    :meth:`follow` to poll a metrics file written by a torchrun job.
    """

    def __init__(self, every: int = 1):
        from IPython.display import display

        self.records: list[dict] = []
        self.every, self._seen = max(1, int(every)), 0
        self.handle = display(None, display_id=True)
        self.fig = None

    def redraw(self) -> None:
        """Draw the current records into the display slot."""
        import matplotlib.pyplot as plt

        self.fig = plot_curves(self.records, self.fig)
        if self.handle is not None:
            self.handle.update(self.fig)
        plt.close(self.fig)

    def callback(self, record: dict) -> None:
        """Take one record; redraw after every ``every`` records and after each evaluation."""
        self.records.append(record)
        self._seen += 1
        if self._seen % self.every == 0 or record.get("kind") in ("eval", "train_epoch"):
            self.redraw()

    def follow(self, path: str | os.PathLike, is_running: Callable[[], bool], interval_s: float = 5.0) -> None:
        """Re-read ``path`` every ``interval_s`` while ``is_running()``, redrawing; then once more."""
        while True:
            running = is_running()
            self.records = read_json_lines(path)
            self.redraw()
            if not running:
                return
            time.sleep(interval_s)


def plot_predicted_clips(cfg, eval_dir: str | os.PathLike, num_videos: int = 3, frames_per_video: int = 4,
                         max_tracks: int = 5, min_score: float = 0.05) -> list:
    """Pictures of an evaluation's predictions: for the first ``num_videos`` validation videos, a row of
    ``frames_per_video`` frames with the ``max_tracks`` best tracks (score ≥ ``min_score``) overlaid.

    eval_dir: the ``eval_epoch_{e}`` folder written during training (results in TEST.SAVE_PATH/results.json).
    Returns the matplotlib figures.
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from pycocotools import mask as mask_utils

    from devis_core.data.vis import build_vis_test_dataset
    from devis_core.inference import original_frames
    from devis_core.visualize import colors_for_ids, overlay_masks

    results_path = Path(eval_dir) / str(cfg.TEST.SAVE_PATH) / "results.json"
    if not results_path.is_file():
        raise FileNotFoundError(f"{results_path}: no results.json; did an evaluation run for this epoch?")
    results = json.loads(results_path.read_text())
    dataset, _ = build_vis_test_dataset(cfg)
    figs = []
    for pos, video in enumerate(dataset.index.videos[:num_videos]):
        tracks = sorted((r for r in results if r["video_id"] == video["id"] and r["score"] >= min_score),
                        key=lambda r: -r["score"])[:max_tracks]
        length = len(video["file_names"])
        ids = sorted(set(np.linspace(0, length - 1, min(frames_per_video, length)).round().astype(int).tolist()))
        frames = original_frames(dataset, pos, ids)
        colors = colors_for_ids(range(1, len(tracks) + 1))
        fig, axes = plt.subplots(1, len(ids), figsize=(3.2 * len(ids), 2.6), squeeze=False)
        for ax, t, img in zip(axes[0], ids, frames):
            masks = [mask_utils.decode(tr["segmentations"][t]).astype(bool) if tr["segmentations"][t] else
                     np.zeros(img.shape[:2], bool) for tr in tracks]
            shown = overlay_masks(img, np.stack(masks), colors) if masks else img
            ax.imshow(shown)
            ax.set_title(f"video {video['id']} frame {t}", fontsize=8)
            ax.axis("off")
        labels = ", ".join(f"cat {tr['category_id']} ({tr['score']:.2f})" for tr in tracks) or "no track"
        fig.suptitle(f"predicted tracks: {labels}", fontsize=8)
        fig.tight_layout()
        figs.append(fig)
    return figs
