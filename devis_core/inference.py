"""Near-online video inference: clips through DeVIS, the clip tracker, result files and evaluation (spec §7).

One video at a time: :func:`infer_video` cuts it into clips (``tracking.partition_clips``), loads the
frames of each clip only when that clip is due, runs ``DeVIS.inference`` on it and hands the per-clip
result to the clip tracker, which RLE-encodes every frame as soon as it can no longer change; so a long
video never holds more than two clips of input frames and the overlap windows of soft masks.

:func:`run_inference` does a whole dataset, split over ``torch.distributed`` ranks (rank r takes videos
r, r + W, ...); rank 0 gathers the entries back into file order, writes ``results.json`` +
``results.zip`` and, when the annotation file has ground truth, the YouTube-VIS metrics. The same code
runs as one process or under ``torchrun``::

    python -m devis_core.inference --config-file devis/YT-19/devis_R_50_YT-19.yaml --weights w.pth --out out
    torchrun --nproc_per_node=2 -m devis_core.inference --config-file ... --weights w.pth --out out
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .engine import autocast, to_float
from .distributed import cleanup_distributed, get_rank, get_world_size, init_distributed
from .evaluation import VideoInstanceEvaluator, format_metrics, load_ground_truth, write_metrics
from .models.nested import NestedTensor
from .fileio import atomic_write_text
from .precision import configure_tf32
from .results import merge_results, write_results
from .tracking import build_tracker, partition_clips

METRICS_NAME = "metrics.json"
SUMMARY_NAME = "inference_summary.json"
# Where a clip visualisation goes inside OUT_VIZ_PATH/<video>/ (official layout, spec §10).
CLIP_VIZ_DIR = "clip_results"

LoadFrames = Callable[[Sequence[int]], Tensor]
OnClip = Callable[[int, list, dict], None]


class InferenceError(RuntimeError):
    """Inference cannot go on: bad frames from a loader, an unknown video name, a missing helper."""


@dataclasses.dataclass
class InferenceTiming:
    """Seconds spent in the model forward and in the tracker, and the frames they covered.

    ``fps`` follows the official count (total frames / (forward + stitching)); data loading is not
    counted. Our stitching time includes the tracker's mask upsampling and RLE encoding, which the
    official count left out, so our figure is a slightly conservative one.
    """

    frames: int = 0
    forward_s: float = 0.0
    stitch_s: float = 0.0

    @property
    def fps(self) -> float:
        total = self.forward_s + self.stitch_s
        return self.frames / total if total > 0 else 0.0

    def add(self, other: "InferenceTiming") -> None:
        self.frames += other.frames
        self.forward_s += other.forward_s
        self.stitch_s += other.stitch_s


def _synchronize(device: torch.device) -> None:
    # CUDA kernels run asynchronously: without a sync the clock would stop before the work is done.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clip_frames(load_frames: LoadFrames, frame_ids: Sequence[int], cache: dict[int, Tensor],
                 video_id: int, device: torch.device) -> Tensor:
    """Frames of one clip, (T, 3, h, w) on ``device``; frames the previous clip already loaded are reused
    where they already are, the rest are requested in one ``load_frames`` call and copied over once (so
    overlapping frames cross to the GPU once, not once per clip). ``cache`` is replaced by this clip's
    frames."""
    missing = [f for f in dict.fromkeys(frame_ids) if f not in cache]
    loaded: dict[int, Tensor] = {f: cache[f] for f in dict.fromkeys(frame_ids) if f in cache}
    if missing:
        batch = load_frames(missing)
        if not isinstance(batch, Tensor) or batch.dim() != 4 or batch.shape[0] != len(missing) \
                or batch.shape[1] != 3:
            shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
            raise InferenceError(f"video {video_id}: load_frames({missing}) returned {shape}, expected a tensor "
                                 f"({len(missing)}, 3, h, w)")
        loaded.update(zip(missing, batch.to(device, non_blocking=True).unbind(0)))
    sizes = {tuple(t.shape[-2:]) for t in loaded.values()}
    if len(sizes) != 1:
        raise InferenceError(f"video {video_id}: frames {list(frame_ids)} come in several sizes {sorted(sizes)}; "
                             "all frames of a video must be resized to one size (spec §7.2)")
    cache.clear()
    cache.update(loaded)
    return torch.stack([loaded[f] for f in frame_ids])


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode for the block and give it back its previous mode afterwards (a training
    loop that evaluates between epochs goes on training)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def infer_video(model: nn.Module, load_frames: LoadFrames, video_id: int, video_length: int,
                original_size: Sequence[int], cfg, device: torch.device | str, on_clip: OnClip | None = None,
                timing: InferenceTiming | None = None) -> list[dict]:
    """Near-online inference of one video: clip partition (§7.1), per-clip model inference (§7.3) and
    multi-cue clip tracking (§7.4).

    model: a DeVIS model (run in eval mode; its previous mode is restored). load_frames(frame_ids) -> (len(frame_ids), 3, h, w)
    float frames, pre-processed as in §7.2; it is called once per clip with the frames the previous clip
    did not already load, never for the whole video at once. video_length: L frames; original_size:
    (H0, W0) of the video, the size of the output masks. cfg: reads MODEL.DEVIS.NUM_FRAMES,
    TEST.CLIP_TRACKING.*, TEST.NUM_OUT, SOLVER.AMP (bfloat16 autocast for the model; the tracker gets
    float32). on_clip(clip_index, frame_ids, clip_result): called for every
    clip with its real frame ids (length min(T, L)) and the model's per-clip result (masks still /4
    logits). timing: accumulates forward / stitching seconds and frames.

    Returns the YouTube-VIS entries of the video, ``{"video_id", "score", "category_id",
    "segmentations": [RLE {"size": [H0, W0], "counts": str} | None] * L}``, in track order.
    """
    device = torch.device(device)
    num_frames = int(cfg.MODEL.DEVIS.NUM_FRAMES)
    clips, _ = partition_clips(int(video_length), num_frames, int(cfg.TEST.CLIP_TRACKING.STRIDE))
    clip_length = min(num_frames, int(video_length))
    original_size = (int(original_size[0]), int(original_size[1]))
    tracker = build_tracker(cfg, int(video_id), int(video_length), original_size)
    own_timing = InferenceTiming()
    cache: dict[int, Tensor] = {}
    amp = bool(cfg.SOLVER.AMP)
    # no_grad rather than inference_mode: attention.py caches host copies keyed on tensor version
    # counters, which inference tensors do not have.
    with eval_mode(model), torch.no_grad():
        for index, frame_ids in enumerate(clips):
            frames = _clip_frames(load_frames, frame_ids, cache, video_id, device)
            samples = NestedTensor(frames, torch.zeros((frames.shape[0], *frames.shape[-2:]), dtype=torch.bool,
                                                       device=device))
            _synchronize(device)
            t0 = time.perf_counter()
            with autocast(device, amp):
                result = model.inference(samples, original_size, clip_length)
            if amp:
                # the tracker's scores, boxes and soft masks are read through numpy, which has no bfloat16
                result = to_float(result)
            _synchronize(device)
            t1 = time.perf_counter()
            if on_clip is not None:
                on_clip(index, list(frame_ids[:clip_length]), result)
            t2 = time.perf_counter()
            tracker.add_clip(result, frame_ids[0], clip_length)
            _synchronize(device)
            own_timing.forward_s += t1 - t0
            own_timing.stitch_s += time.perf_counter() - t2
        t0 = time.perf_counter()
        entries = tracker.finish()
        own_timing.stitch_s += time.perf_counter() - t0
    own_timing.frames = int(video_length)
    if timing is not None:
        timing.add(own_timing)
    return entries


# --------------------------------------------------------------------------------------------------
# Visualisation hooks (TEST.VIZ.*)
# --------------------------------------------------------------------------------------------------

def visualisation_function(name: str) -> Callable:
    """The result-visualisation helper ``name`` from ``devis_core.result_viz`` (or ``devis_core.visualize``).

    Raises InferenceError saying which TEST.VIZ keys need it when neither module provides it.
    """
    import importlib

    for module_name in ("devis_core.result_viz", "devis_core.visualize"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise InferenceError(f"result visualisation needs devis_core.result_viz.{name} (or devis_core.visualize.{name}), "
                         "which this checkout does not provide; unset TEST.VIZ.OUT_VIZ_PATH (and SAVE_CLIP_VIZ / "
                         "SAVE_MERGED_TRACKS) or add the visualisation module")


def video_name(video: dict) -> str:
    """A video's folder name: the directory of its first frame (what TEST.VIZ.VIDEO_NAMES lists)."""
    return os.path.dirname(video["file_names"][0]) or str(video["id"])


def original_frames(dataset, idx: int, frame_ids: Sequence[int] | None = None) -> list[np.ndarray]:
    """Frames of video ``idx`` of a VISTestDataset at their original size: list of (H0, W0, 3) uint8 RGB."""
    from .data.vis import _read_frame

    video = dataset.index.videos[idx]
    ids = range(len(video["file_names"])) if frame_ids is None else frame_ids
    return [np.asarray(_read_frame(dataset.index, video, t, (video["height"], video["width"]))) for t in ids]


def select_videos(dataset, video_names: str = "", max_videos: int | None = None) -> list[int]:
    """Positions of the videos to run: all, or those named in the comma-separated ``video_names``
    (TEST.VIZ.VIDEO_NAMES, folder names), then the first ``max_videos`` of them."""
    videos = dataset.index.videos
    positions = list(range(len(videos)))
    names = [n.strip() for n in str(video_names).split(",") if n.strip()]
    if names:
        by_name = {video_name(v): i for i, v in enumerate(videos)}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise InferenceError(f"{dataset.index.ann_file}: TEST.VIZ.VIDEO_NAMES lists {unknown}, which are not "
                                 f"video folders of the file (e.g. {sorted(by_name)[:3]})")
        positions = sorted(by_name[n] for n in names)
    if max_videos is not None:
        if int(max_videos) < 1:
            raise ValueError(f"max_videos must be >= 1 or None, got {max_videos}")
        positions = positions[:int(max_videos)]
    return positions


def _viz_root(cfg, out_dir: str) -> str | None:
    path = str(cfg.TEST.VIZ.OUT_VIZ_PATH)
    if not path:
        if cfg.TEST.VIZ.SAVE_CLIP_VIZ or cfg.TEST.VIZ.SAVE_MERGED_TRACKS:
            raise InferenceError("TEST.VIZ.SAVE_CLIP_VIZ / SAVE_MERGED_TRACKS need TEST.VIZ.OUT_VIZ_PATH "
                                 "(the folder to write the pictures to)")
        return None
    # A relative OUT_VIZ_PATH lives beside the results, so a run's outputs stay in one place.
    return path if os.path.isabs(path) else os.path.join(out_dir, path)


# --------------------------------------------------------------------------------------------------
# A whole dataset, one or many processes
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class InferenceReport:
    """What a finished run produced (rank 0). ``metrics`` is None without ground truth."""

    results: list[dict]
    results_json: str
    results_zip: str
    timing: InferenceTiming
    num_videos: int
    world_size: int
    metrics: dict | None = None
    metrics_json: str | None = None

    def summary(self) -> str:
        """One paragraph: videos, frames, tracks, speed, where the files are."""
        t = self.timing
        lines = [f"videos: {self.num_videos}  frames: {t.frames}  tracks: {len(self.results)}  "
                 f"processes: {self.world_size}",
                 f"model forward: {t.forward_s:.2f} s  stitching: {t.stitch_s:.2f} s  "
                 f"speed: {t.fps:.2f} frames/s per process (forward + stitching)",
                 f"results: {self.results_json}", f"zip for the evaluation server: {self.results_zip}"]
        if self.metrics_json:
            lines.append(f"metrics: {self.metrics_json}")
        return "\n".join(lines)


def _ground_truth_for(ann_file: str, video_ids: Sequence[int]) -> dict | None:
    """The annotation file restricted to ``video_ids``, or None when it has no ground truth (public
    validation splits: ``annotations`` missing, null or empty)."""
    with open(ann_file, encoding="utf-8") as fh:
        data = json.load(fh)
    if not data.get("annotations"):
        return None
    keep = set(video_ids)
    # Scoring a subset (max_videos, VIDEO_NAMES) against every video would count the others as missed.
    return {**data, "videos": [v for v in data["videos"] if v["id"] in keep],
            "annotations": [a for a in data["annotations"] if a["video_id"] in keep]}


def _write_json(path: str, obj) -> None:
    """Write ``obj`` as JSON atomically (temporary name in the same folder, then rename)."""
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def run_inference_report(cfg, model: nn.Module, dataset, out_dir: str | os.PathLike, device: torch.device | str,
                         max_videos: int | None = None, verbose: bool = True) -> InferenceReport | None:
    """:func:`run_inference`, returning an :class:`InferenceReport` (results, timing, metrics) on rank 0."""
    device = torch.device(device)
    configure_tf32(bool(cfg.TF32))
    out_dir = os.fspath(out_dir)
    rank, world = get_rank(), get_world_size()
    positions = select_videos(dataset, cfg.TEST.VIZ.VIDEO_NAMES, max_videos)
    viz_root = _viz_root(cfg, out_dir)
    write_video_viz = save_clip_viz = None
    if viz_root is not None:
        write_video_viz = visualisation_function("write_video_visualisations")
        if cfg.TEST.VIZ.SAVE_CLIP_VIZ:
            save_clip_viz = visualisation_function("save_clip_visualisation")
    model.to(device)
    timing = InferenceTiming()
    mine: list[tuple[int, list[dict]]] = []
    for n, pos in enumerate(positions[rank::world]):
        video = dataset.index.videos[pos]
        length, size = len(video["file_names"]), (video["height"], video["width"])
        on_clip = None
        if save_clip_viz is not None:
            clip_root = os.path.join(viz_root, video_name(video), CLIP_VIZ_DIR)

            def save_window(index, frame_ids, result, _pos=pos, _size=size, _root=clip_root):
                ct = cfg.TEST.CLIP_TRACKING
                save_clip_viz(original_frames(dataset, _pos, frame_ids), result, frame_ids,
                              os.path.join(_root, f"window_{index}"), _size,
                              category_names=dataset.index.categories, min_frame_score=ct.MIN_FRAME_SCORE,
                              min_track_score=ct.MIN_TRACK_SCORE)
            on_clip = save_window

        t0 = time.perf_counter()
        entries = infer_video(model, lambda ids, _pos=pos: dataset.load_frames(_pos, ids), video["id"], length,
                              size, cfg, device, on_clip=on_clip, timing=timing)
        if write_video_viz is not None:
            write_video_viz(original_frames(dataset, pos), entries, os.path.join(viz_root, video_name(video)),
                            per_track=True, merged=bool(cfg.TEST.VIZ.SAVE_MERGED_TRACKS), animation=None,
                            category_names=dataset.index.categories)
        mine.append((pos, entries))
        if verbose:
            print(f"[rank {rank}] video {n + 1}/{len(positions[rank::world])} id={video['id']} frames={length} "
                  f"tracks={len(entries)} ({time.perf_counter() - t0:.1f} s)", flush=True)

    payload = {"videos": mine, "timing": dataclasses.asdict(timing)}
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(payload, gathered, dst=0)
        if rank != 0:
            return None
    else:
        gathered = [payload]
    per_video, timing = [], InferenceTiming()
    for part in gathered:
        per_video.extend(part["videos"])
        timing.add(InferenceTiming(**part["timing"]))
    # Rank r took videos r, r + W, ...: sorting by position restores the single-process (file) order.
    per_video.sort(key=lambda item: item[0])
    results = merge_results([entries for _, entries in per_video])

    save_dir = os.path.join(out_dir, str(cfg.TEST.SAVE_PATH))
    json_path, zip_path = write_results(results, save_dir)
    report = InferenceReport(results, json_path, zip_path, timing, len(per_video), world)
    gt = _ground_truth_for(dataset.index.ann_file, [dataset.index.videos[p]["id"] for p, _ in per_video])
    if gt is not None:
        evaluator = VideoInstanceEvaluator(load_ground_truth(gt, name=dataset.index.ann_file))
        evaluator.process(results, source=json_path)
        report.metrics = evaluator.evaluate()
        report.metrics_json = os.path.join(save_dir, METRICS_NAME)
        write_metrics(report.metrics_json, report.metrics)
    summary = {"num_videos": report.num_videos, "num_tracks": len(results), "world_size": world,
               **dataclasses.asdict(timing), "fps": timing.fps}
    _write_json(os.path.join(save_dir, SUMMARY_NAME), summary)
    if verbose:
        if report.metrics is not None:
            print(format_metrics(report.metrics))
        print(report.summary(), flush=True)
    return report


def run_inference(cfg, model: nn.Module, dataset, out_dir: str | os.PathLike,
                  device: torch.device | str) -> list[dict] | None:
    """Near-online inference over a VISTestDataset, split across ``torch.distributed`` ranks.

    Rank r runs videos r, r + W, ... (of those TEST.VIZ.VIDEO_NAMES selects); rank 0 gathers every
    rank's entries, puts them in file order, writes ``results.json`` + ``results.zip`` (and
    ``inference_summary.json`` with the timing) under ``out_dir/TEST.SAVE_PATH`` atomically, and when the
    annotation file has ground truth prints the YouTube-VIS table and writes ``metrics.json`` there.
    TEST.VIZ.OUT_VIZ_PATH (relative: under ``out_dir``) turns on the result pictures.

    Returns the merged entries on rank 0 and None on the other ranks.
    """
    report = run_inference_report(cfg, model, dataset, out_dir, device)
    return None if report is None else report.results


# --------------------------------------------------------------------------------------------------
# From a config: the CLI and the evaluate notebook
# --------------------------------------------------------------------------------------------------

def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'cuda' / 'cuda:N' / 'cpu' as a torch.device; under torchrun plain 'cuda' means cuda:LOCAL_RANK."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InferenceError(f"device {name!r} requested (DEVICE / --device) but CUDA is not available; "
                                 "use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def evaluation_config(config_file: str | None, overrides: Sequence[str] = (), weights: str | None = None,
                      dataset: str | None = None, data_path: str | None = None, output_dir: str | None = None):
    """The run's config: ``config_file``, then ``overrides``, then the explicit arguments (MODEL.WEIGHTS,
    DATASETS.VAL_DATASET, DATASETS.DATA_PATH, OUTPUT_DIR) that are not None."""
    from .config import load_config

    extra = []
    for key, value in (("MODEL.WEIGHTS", weights), ("DATASETS.VAL_DATASET", dataset),
                       ("DATASETS.DATA_PATH", data_path), ("OUTPUT_DIR", output_dir)):
        if value is not None:
            extra += [key, str(value)]
    cfg = load_config(config_file or None, list(overrides) + extra)
    if cfg.DATASETS.TYPE != "vis":
        raise InferenceError(f"{config_file}: DATASETS.TYPE is {cfg.DATASETS.TYPE!r}; video inference needs 'vis'")
    if not cfg.MODEL.WEIGHTS:
        raise InferenceError(f"{config_file}: no weights to evaluate: pass --weights (weights=) or set MODEL.WEIGHTS")
    return cfg


def evaluate_checkpoint(config_file: str | None, overrides: Sequence[str] = (), weights: str | None = None,
                        dataset: str | None = None, data_path: str | None = None, output_dir: str | None = None,
                        max_videos: int | None = None, device: str | None = None,
                        verbose: bool = True) -> InferenceReport | None:
    """Build the test set and the model from a config and run :func:`run_inference_report` on it.

    The arguments that are not None override the config (see :func:`evaluation_config`); ``device``
    defaults to DEVICE. Works in one process and under an initialised process group.
    """
    from .data.vis import build_vis_test_dataset
    from .models import build_model

    cfg = evaluation_config(config_file, overrides, weights, dataset, data_path, output_dir)
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if get_world_size() > 1 else 0
    dev = resolve_device(device or cfg.DEVICE, local_rank)
    test_set, num_classes = build_vis_test_dataset(cfg)
    model = build_model(cfg, num_classes, load_weights=True)
    return run_inference_report(cfg, model, test_set, cfg.OUTPUT_DIR, dev, max_videos=max_videos, verbose=verbose)


def main(argv: list[str] | None = None) -> int:
    """Command line; under torchrun (WORLD_SIZE > 1) the process group is set up from the environment
    (NCCL on CUDA, gloo on CPU) and each process uses cuda:LOCAL_RANK or the CPU."""
    from .config import add_config_arguments, load_config

    parser = argparse.ArgumentParser(prog="python -m devis_core.inference", description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--weights", help="checkpoint to evaluate (sets MODEL.WEIGHTS)")
    parser.add_argument("--out", help="output folder (sets OUTPUT_DIR); results go to OUT/TEST.SAVE_PATH")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: the config's DEVICE)")
    parser.add_argument("--max-videos", type=int, help="run only the first N videos")
    args = parser.parse_args(argv)

    device_name = args.device or load_config(args.config_file or None, args.opts).DEVICE
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _, _, device = init_distributed(device_name)
    else:
        device = resolve_device(device_name)
    try:
        evaluate_checkpoint(args.config_file, args.opts, weights=args.weights, output_dir=args.out,
                            max_videos=args.max_videos, device=str(device))
    finally:
        cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
