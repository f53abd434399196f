"""End-to-end DeVIS benchmark (issue 8, item 1): training iteration, per-clip inference, whole video pipeline.

Per (dtype, size): a training iteration exactly as ``engine.train_one_epoch`` runs it (zero_grad,
``engine.compute_losses``, backward, gradient clipping to SOLVER.GRAD_CLIP_MAX_NORM, AdamW step) with its
peak memory; ``DeVIS.inference`` on one clip (model and per-clip post-processing) in ms and frames/s; and
``inference.infer_video`` on a synthetic video (tracking, mask upsampling to the original size, RLE) in
frames/s. bfloat16 means SOLVER.AMP (autocast; criterion and matchers in float32, as the trainer does).
Random weights, a deterministic synthetic clip (``synthetic_clip``) in the VIS training loader's format.
CUDA events (perf_counter on the CPU), warm-up, median. Also: a coarse per-stage breakdown of an
iteration (forward hooks and explicit ranges added here, no model file touched) and, with ``profile``,
torch.profiler tables of the top ops.

Run ``python -m devis_core.benchmarks.model --out bench.json`` (``--help`` for options); the table is
printed last.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torchvision import tv_tensors

from devis_core.benchmarks.attention import _time, _time_cpu
from devis_core.config import load_config
from devis_core.data.synthetic import SHAPES, render_scene, sample_scene
from devis_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from devis_core.data.vis import collate_clips
from devis_core.data.vis_transforms import ToClipTargets
from devis_core.data.ytvis_format import mask_to_box
from devis_core.engine import autocast, compute_losses, prepare_for_amp, to_float
from devis_core.fileio import atomic_write_text
from devis_core.models.nested import NestedTensor
from devis_core.precision import configure_tf32
from devis_core.optim import trainable_parameters

__all__ = ["REFERENCE", "TARGETS", "DEFAULT_CONFIG", "Setup", "parse_size", "synthetic_clip", "synthetic_video",
           "resolve_num_classes", "build_setup", "train_step", "AmpInference", "StageTimer", "time_train",
           "time_inference", "time_pipeline", "stage_breakdown", "profile_tables", "tf32_mode", "run_benchmark",
           "format_table", "format_targets", "format_breakdown", "save_results", "main"]

DEFAULT_CONFIG = "devis/YT-19/devis_R_50_YT-19.yaml"
DEFAULT_SIZES = ("360x640", "512x768")
DTYPES = ("float32", "bfloat16")
# The official code on one H100: float32, YT-19 R50 config, random weights, one clip of T=6 frames at
# 360x640 with 3 instances. Inference = model and per-clip post-processing, no tracking.
REFERENCE = {"size": "360x640", "dtype": "float32", "frames": 6, "train_ms": 410.0, "train_peak_gib": 8.9,
             "infer_ms": 104.0, "model_fps": 57.6}
# Issue 8 targets (ours, H100, T=6, 360x640).
TARGETS = {"train_ms": 200.0, "train_peak_gib": 4.5, "model_fps": 115.0, "pipeline_fps": 60.0}
STAGES_TRAIN = ("backbone", "encoder", "decoder", "mask head", "matcher", "criterion", "other forward",
                "backward", "grad clip", "optimiser step", "other")
STAGES_INFER = ("backbone", "encoder", "decoder", "mask head", "other (heads, post-processing)")


def parse_size(text: str) -> tuple[int, int]:
    """'360x640' -> (360, 640) as (H, W); a clear error for anything else."""
    parts = str(text).lower().split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"size {text!r}: expected HxW with positive integers, e.g. 360x640") from None
    if h < 1 or w < 1:
        raise ValueError(f"size {text!r}: expected HxW with positive integers, e.g. 360x640")
    return h, w


def _size_name(size: Sequence[int]) -> str:
    return f"{int(size[0])}x{int(size[1])}"


# ---------------------------------------------------------------------------------------------
# synthetic inputs


def _render(num_frames: int, size: Sequence[int], num_instances: int, seed: int):
    """frames (T, H, W, 3) uint8 RGB, visible masks (N, T, H, W) bool, category ids (N,) in 1..8."""
    rng = np.random.default_rng(seed)
    cats = [i % len(SHAPES) + 1 for i in range(num_instances)]
    # cross_prob 0: every object stays inside the frame, so the clip keeps its K trajectories
    scene = sample_scene(rng, num_frames, (int(size[0]), int(size[1])), cats, cross_prob=0.0)
    frames, visible, _ = render_scene(scene)
    return frames, visible, cats


def synthetic_clip(num_frames: int, size: Sequence[int], num_instances: int = 3, num_classes: int = 40,
                   seed: int = 0, create_box_from_mask: bool = True) -> tuple[NestedTensor, list[dict]]:
    """One training clip in exactly the format the VIS training loader yields (``collate_clips`` of
    ``ToClipTargets``' output): moving textured shapes drawn by ``devis_core.data.synthetic``.

    size: (H, W). Returns (samples NestedTensor tensors (T, 3, H, W) normalised RGB + mask (T, H, W) all
    False; [target]) with target boxes (N·T, 4) normalised cx, cy, w, h (absent frames: filler box),
    labels (N·T,) 0-based, valid (N·T,) bool, masks (N·T, H, W) bool, size (2,), num_trajectories (),
    orig_size (2,), video_id (), frame_ids (T,); instance-major (n·T + t), N ≤ num_instances (an
    instance hidden on every frame is dropped, as the loader does).
    """
    if num_instances < 1:
        raise ValueError(f"synthetic_clip: num_instances must be >= 1, got {num_instances}")
    frames, visible, cats = _render(num_frames, size, num_instances, seed)
    n, t_len, h, w = visible.shape
    boxes = np.zeros((n, t_len, 4), dtype=np.float32)
    for i in range(n):
        for t in range(t_len):
            x, y, bw, bh = mask_to_box(visible[i, t])
            boxes[i, t] = (x, y, x + bw, y + bh)          # raw loader boxes: xyxy pixels
    raw = {
        "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes.reshape(n * t_len, 4)), format="XYXY",
                                          canvas_size=(h, w)),
        "masks": tv_tensors.Mask(torch.from_numpy(visible.reshape(n * t_len, h, w)).to(torch.uint8)),
        "valid": torch.from_numpy(visible.reshape(n * t_len, -1).any(1)),
        "labels": torch.tensor([(c - 1) % num_classes for c in cats], dtype=torch.int64),
        "orig_size": torch.tensor([h, w], dtype=torch.int64),
        "video_id": torch.tensor(seed, dtype=torch.int64),
        "frame_ids": torch.arange(t_len, dtype=torch.int64),
    }
    video = tv_tensors.Video(torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous())
    clip = ToClipTargets(t_len, create_box_from_mask=create_box_from_mask)(video, raw)
    return collate_clips([clip])


def synthetic_video(num_frames: int, size: Sequence[int], num_instances: int = 3, seed: int = 0) -> Tensor:
    """Test-time frames of a synthetic video: (L, 3, H, W) float32 normalised RGB (what
    ``VISTestDataset.load_frames`` returns), L = ``num_frames``."""
    frames, _, _ = _render(num_frames, size, num_instances, seed)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------------------------------------
# model, criterion, optimiser and the two steps


@dataclass
class Setup:
    """What the trainer builds from a config: model, criterion, optimiser on ``device``; ``amp`` =
    SOLVER.AMP (bfloat16 autocast)."""
    cfg: object
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    amp: bool
    num_classes: int


def resolve_num_classes(cfg, num_classes: int | None = None) -> int:
    """``num_classes`` when given, else the fixed class count of DATASETS.TRAIN_DATASET in the registry
    (40 for YouTube-VIS); datasets whose count comes from their annotation file need it explicitly."""
    from devis_core.data.registry import get_dataset_spec

    if num_classes is not None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        return int(num_classes)
    spec = get_dataset_spec(cfg.DATASETS.TRAIN_DATASET)
    if spec.num_classes is None:
        raise ValueError(f"DATASETS.TRAIN_DATASET {cfg.DATASETS.TRAIN_DATASET!r} takes its class count from its "
                         "annotation file, which the benchmark does not read: pass num_classes (--num-classes)")
    return int(spec.num_classes)


def build_setup(cfg, num_classes: int, device: torch.device | str, seed: int = 0) -> Setup:
    """Random-weight model (``build_model(..., load_weights=False)``), criterion and optimiser as
    ``devis_core.train`` builds them, matchers wrapped for AMP when SOLVER.AMP."""
    from devis_core.criterion import build_criterion
    from devis_core.models import build_model
    from devis_core.optim import build_optimizer

    if cfg.DATASETS.TYPE != "vis":
        raise ValueError(f"benchmark: DATASETS.TYPE is {cfg.DATASETS.TYPE!r}; the DeVIS benchmark needs 'vis'")
    device = torch.device(device)
    torch.manual_seed(seed)
    model = build_model(cfg, num_classes, load_weights=False).to(device)
    criterion = build_criterion(cfg, num_classes).to(device)
    optimizer = build_optimizer(cfg, model)
    amp = bool(cfg.SOLVER.AMP)
    if amp:
        prepare_for_amp(model, criterion)
    return Setup(cfg, model, criterion, optimizer, device, amp, num_classes)


def _stage(timer: "StageTimer | None", name: str):
    return timer.range(name) if timer is not None else contextlib.nullcontext()


def train_step(setup: Setup, samples: NestedTensor, targets: list[dict], timer: "StageTimer | None" = None) -> Tensor:
    """One training iteration as ``engine.train_one_epoch`` runs it; returns the weighted loss () (not
    synchronised). samples / targets: one clip on ``setup.device`` (``synthetic_clip``)."""
    s = setup
    s.model.train()
    s.criterion.train()
    with _stage(timer, "iteration"):
        s.optimizer.zero_grad(set_to_none=True)
        loss, _ = compute_losses(s.model, s.criterion, samples, targets, s.amp)
        with _stage(timer, "backward"):
            loss.backward()
        max_norm = float(s.cfg.SOLVER.GRAD_CLIP_MAX_NORM)
        if max_norm > 0:
            with _stage(timer, "grad clip"):
                torch.nn.utils.clip_grad_norm_(trainable_parameters(s.optimizer), max_norm)
        with _stage(timer, "optimiser step"):
            s.optimizer.step()
    return loss.detach()


class AmpInference(nn.Module):
    """``model.inference`` under the setup's autocast, results cast back to float32: what
    ``inference.infer_video`` does around each clip (SOLVER.AMP), for the model-only timings."""

    def __init__(self, model: nn.Module, amp: bool):
        super().__init__()
        self.model = model
        self.amp = amp

    @torch.no_grad()
    def inference(self, samples: NestedTensor, tgt_size, clip_length: int | None = None) -> dict:
        """Same arguments and result as ``DeVIS.inference`` (floating tensors float32)."""
        with autocast(samples.tensors.device, self.amp):
            res = self.model.inference(samples, tgt_size, clip_length)
        return to_float(res) if self.amp else res


def _clip_samples(frames: Tensor) -> NestedTensor:
    """frames (T, 3, H, W) on the device -> NestedTensor with an all-False mask, as infer_video builds it."""
    return NestedTensor(frames, torch.zeros((frames.shape[0], *frames.shape[-2:]), dtype=torch.bool,
                                            device=frames.device))


# ---------------------------------------------------------------------------------------------
# stage ranges


class StageTimer:
    """Named, nestable time ranges of one run: CUDA events on a GPU (no synchronisation inserted),
    perf_counter on the CPU.

    ``range(name)`` is a context manager; ``hook(module, name)`` opens a range around every forward of
    ``module``; ``wrap(obj, attr, name)`` around every call of ``obj.attr`` (the matchers, which are not
    modules). ``exclusive_ms()`` sums each name's time minus its children's (call after the work).
    """

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.records: list[list] = []          # [name, parent index, start mark, end mark]
        self._stack: list[int] = []
        self._undo: list = []

    def _mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def open(self, name: str) -> None:
        """Start range ``name`` inside the innermost open range."""
        self.records.append([name, self._stack[-1] if self._stack else None, self._mark(), None])
        self._stack.append(len(self.records) - 1)

    def close(self) -> None:
        """End the innermost open range."""
        self.records[self._stack.pop()][3] = self._mark()

    @contextlib.contextmanager
    def range(self, name: str):
        """Context manager: range ``name`` around the block."""
        self.open(name)
        try:
            yield
        finally:
            self.close()

    def hook(self, module: nn.Module, name: str) -> None:
        """Range ``name`` around every forward of ``module`` (until :meth:`remove`)."""
        self._undo.append(module.register_forward_pre_hook(lambda m, a: self.open(name)).remove)
        self._undo.append(module.register_forward_hook(lambda m, a, o: self.close()).remove)

    def wrap(self, obj, attr: str, name: str) -> None:
        """Range ``name`` around every call of the callable ``obj.attr`` and of its methods (a matcher's
        batched ``match_layers`` too, so callers that look for it still find it), until :meth:`remove`."""
        target = getattr(obj, attr)
        setattr(obj, attr, _TimedCallable(target, self, name))
        self._undo.append(lambda: setattr(obj, attr, target))

    def remove(self) -> None:
        """Take every hook and wrapper off again."""
        while self._undo:
            self._undo.pop()()

    def reset(self) -> None:
        """Forget the recorded ranges (hooks stay)."""
        self.records.clear()

    def exclusive_ms(self) -> dict[str, float]:
        """{name: Σ over its ranges of (duration − duration of direct children)} in ms."""
        if self.cuda:
            torch.cuda.synchronize()
        dur = [(r[2].elapsed_time(r[3]) if self.cuda else (r[3] - r[2]) * 1e3) for r in self.records]
        excl = list(dur)
        for i, r in enumerate(self.records):
            if r[1] is not None:
                excl[r[1]] -= dur[i]
        out: dict[str, float] = {}
        for r, e in zip(self.records, excl):
            out[r[0]] = out.get(r[0], 0.0) + e
        return out


class _TimedCallable:
    """Stands in for a callable: calls and method calls go to ``target`` inside ``timer.range(name)``;
    attributes ``target`` lacks stay missing."""

    def __init__(self, target, timer: StageTimer, name: str):
        self._target, self._timer, self._name = target, timer, name

    def __call__(self, *args, **kwargs):
        with self._timer.range(self._name):
            return self._target(*args, **kwargs)

    def __getattr__(self, attr: str):
        value = getattr(self._target, attr)
        if not callable(value):
            return value

        def timed(*args, **kwargs):
            with self._timer.range(self._name):
                return value(*args, **kwargs)

        return timed


def _instrument(timer: StageTimer, setup: Setup, training: bool) -> None:
    m = setup.model
    timer.hook(m.def_detr.backbone, "backbone")
    timer.hook(m.def_detr.transformer.encoder, "encoder")
    timer.hook(m.def_detr.transformer.decoder, "decoder")
    timer.hook(m.bbox_attention, "mask head")
    timer.hook(m.mask_head, "mask head")
    if training:
        timer.hook(m, "other forward")
        timer.hook(setup.criterion, "criterion")
        timer.wrap(m, "matcher", "matcher")
        timer.wrap(setup.criterion, "matcher", "matcher")


# ---------------------------------------------------------------------------------------------
# measurements


def _median_ms(fn, device: torch.device, iters: int, warmup: int) -> float:
    """Median ms of fn() over ``iters`` runs after ``warmup``: the attention benchmark's timers."""
    if device.type == "cuda":
        return _time(fn, reps=iters, warmup=warmup)
    return _time_cpu(fn, reps=iters, warmup=warmup)


def _peak_start(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def time_train(setup: Setup, samples: NestedTensor, targets: list[dict], iters: int = 10,
               warmup: int = 3) -> dict:
    """Median ms of :func:`train_step` and the peak memory over the timed iterations (GiB, absolute:
    weights, optimiser state and activations; None on the CPU). Returns {train_ms, train_peak_gib,
    train_loss} (the last step's, checked finite)."""
    dev = setup.device
    for _ in range(max(warmup, 1)):            # the first step allocates AdamW's state: never timed
        train_step(setup, samples, targets)
    losses = []
    _peak_start(dev)
    ms = _median_ms(lambda: losses.append(train_step(setup, samples, targets)), dev, iters, 0)
    peak = _peak_gib(dev)
    loss = float(losses[-1])
    if not math.isfinite(loss):
        raise FloatingPointError(f"benchmark: the training loss is {loss} after {max(warmup, 1) + iters} steps")
    return {"train_ms": ms, "train_peak_gib": peak, "train_loss": loss}


def time_inference(setup: Setup, frames: Tensor, iters: int = 10, warmup: int = 3) -> dict:
    """Median ms of ``DeVIS.inference`` (model and per-clip post-processing) on one clip, eval mode,
    no_grad. frames: (T, 3, H, W) on the device. Returns {infer_ms, infer_peak_gib, model_fps = T/s}."""
    from devis_core.inference import eval_mode

    runner = AmpInference(setup.model, setup.amp)
    samples = _clip_samples(frames)
    size = tuple(frames.shape[-2:])
    dev = setup.device
    with eval_mode(setup.model), torch.no_grad():
        for _ in range(warmup):
            runner.inference(samples, size)
        _peak_start(dev)
        ms = _median_ms(lambda: runner.inference(samples, size), dev, iters, 0)
        peak = _peak_gib(dev)
    return {"infer_ms": ms, "infer_peak_gib": peak, "model_fps": frames.shape[0] / (ms * 1e-3)}


def time_pipeline(setup: Setup, video: Tensor, original_size: Sequence[int], videos: int = 2,
                  warmup: int = 1) -> dict:
    """``inference.infer_video`` (clips, model, tracker, mask upsampling to ``original_size``, RLE) on
    ``video`` (L, 3, h, w) float CPU frames handed out by a preloaded ``load_frames`` (loading is not
    timed). Median wall time over ``videos`` runs after ``warmup``. Returns {pipeline_ms (per video),
    pipeline_fps = L / s, pipeline_forward_s, pipeline_stitch_s (infer_video's own split of the last
    run), pipeline_tracks}."""
    from devis_core.inference import InferenceTiming, infer_video

    length = int(video.shape[0])

    def load_frames(ids):
        return video[list(ids)]

    def once():
        timing = InferenceTiming()
        t0 = time.perf_counter()
        entries = infer_video(setup.model, load_frames, 0, length, original_size, setup.cfg, setup.device,
                              timing=timing)
        if setup.device.type == "cuda":
            torch.cuda.synchronize(setup.device)
        return time.perf_counter() - t0, timing, entries

    for _ in range(warmup):
        once()
    runs = [once() for _ in range(max(videos, 1))]
    wall = statistics.median(r[0] for r in runs)
    _, timing, entries = runs[-1]
    return {"pipeline_ms": wall * 1e3, "pipeline_fps": length / wall, "pipeline_frames": length,
            "pipeline_orig_size": _size_name(original_size), "pipeline_forward_s": timing.forward_s,
            "pipeline_stitch_s": timing.stitch_s, "pipeline_tracks": len(entries)}


def stage_breakdown(setup: Setup, samples: NestedTensor, targets: list[dict], iters: int = 3) -> dict:
    """Where a training iteration and a per-clip inference spend their time: median over ``iters``
    runs of each stage's exclusive ms (STAGES_TRAIN / STAGES_INFER; 'other' = the rest of the
    iteration: zero_grad, casts, ...). Run after warm-up. Returns {'train': {...}, 'inference': {...}}."""
    from devis_core.inference import eval_mode

    timer = StageTimer(setup.device)
    per_train, per_infer = [], []
    try:
        _instrument(timer, setup, training=True)
        for _ in range(iters):
            timer.reset()
            train_step(setup, samples, targets, timer)
            per_train.append(timer.exclusive_ms())
    finally:
        timer.remove()
    runner = AmpInference(setup.model, setup.amp)
    size = tuple(samples.tensors.shape[-2:])
    infer_samples = _clip_samples(samples.tensors)
    try:
        _instrument(timer, setup, training=False)
        with eval_mode(setup.model), torch.no_grad():
            for _ in range(iters):
                timer.reset()
                with timer.range("other (heads, post-processing)"):
                    runner.inference(infer_samples, size)
                per_infer.append(timer.exclusive_ms())
    finally:
        timer.remove()

    def median(runs, names, rename):
        return {n: statistics.median(r.get(rename.get(n, n), 0.0) for r in runs) for n in names}

    return {"train": median(per_train, STAGES_TRAIN, {"other": "iteration"}),
            "inference": median(per_infer, STAGES_INFER, {})}


def _busy_us(events) -> float:
    """Microseconds in which at least one GPU activity of ``events`` (profiler FunctionEvents) ran:
    the union of their intervals, so work overlapping on several streams counts once. User
    annotations (such as the optimiser's step range) span kernels and idle gaps alike and are left out."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
    total, cur_start, cur_end = 0.0, None, None
    for start, end in spans:
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def profile_tables(setup: Setup, samples: NestedTensor, targets: list[dict], iters: int = 3,
                   row_limit: int = 25) -> tuple[dict[str, str], dict[str, float]]:
    """torch.profiler over ``iters`` training iterations and ``iters`` per-clip inferences (run after
    warm-up). Returns (tables, busy). tables: text tables of the top ``row_limit`` ops, 'train_device' /
    'inference_device' by self CUDA time (GPU only) and 'train_cpu' / 'inference_cpu' by self CPU time. Stage totals are
    :func:`stage_breakdown`'s job: profiler ranges would list as ops with their whole span as self
    device time. busy (GPU only, else empty): 'train_gpu_busy_ms' / 'inference_gpu_busy_ms', the time per
    iteration in which some GPU activity ran (:func:`_busy_us`); set against the measured iteration time
    it tells a GPU-bound iteration from one the host cannot feed fast enough."""
    from torch.profiler import ProfilerActivity, profile

    from devis_core.inference import eval_mode

    cuda = setup.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    runner = AmpInference(setup.model, setup.amp)
    infer_samples = _clip_samples(samples.tensors)
    size = tuple(samples.tensors.shape[-2:])
    out, busy = {}, {}
    for kind in ("train", "inference"):
        with profile(activities=activities) as prof:
            if kind == "train":
                for _ in range(iters):
                    train_step(setup, samples, targets)
            else:
                with eval_mode(setup.model), torch.no_grad():
                    for _ in range(iters):
                        runner.inference(infer_samples, size)
            if cuda:
                torch.cuda.synchronize(setup.device)
        averages = prof.key_averages()
        if cuda:
            busy[f"{kind}_gpu_busy_ms"] = _busy_us(prof.events()) / 1e3 / iters
            out[f"{kind}_device"] = averages.table(sort_by="self_device_time_total", row_limit=row_limit)
        out[f"{kind}_cpu"] = averages.table(sort_by="self_cpu_time_total", row_limit=row_limit)
    return out, busy


# ---------------------------------------------------------------------------------------------
# driver


@contextlib.contextmanager
def tf32_mode(enabled: bool):
    """The TF32 config key's setting (``devis_core.precision.configure_tf32``) for the block; the previous
    flags are restored afterwards. Yields {'matmul_tf32', 'cudnn_tf32'}, the flags in force."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    configure_tf32(enabled)
    try:
        yield {"matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
               "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32)}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _case_config(config_file: str, overrides: Sequence[str], dtype: str):
    keys = list(overrides)[0::2]
    if "SOLVER.AMP" in keys:
        raise ValueError("benchmark overrides: SOLVER.AMP is set by the dtype (float32 -> False, bfloat16 -> "
                         "True); choose dtypes with --dtypes instead of overriding it")
    return load_config(config_file, list(overrides) + ["SOLVER.AMP", str(dtype == "bfloat16")])


def run_benchmark(config_file: str = DEFAULT_CONFIG, overrides: Sequence[str] = (),
                  sizes: Sequence[str] = DEFAULT_SIZES, dtypes: Sequence[str] = DTYPES, iters: int = 10,
                  warmup: int = 3, pipeline_frames: int = 36, pipeline_videos: int = 2, orig_scale: float = 1.0,
                  breakdown_iters: int = 3, profile: bool = False, profile_iters: int = 3, tf32: bool = False,
                  device: str | None = None, num_classes: int | None = None, num_instances: int = 3,
                  seed: int = 0, verbose: bool = True) -> dict:
    """Every measurement at every (dtype, size). sizes: 'HxW' strings (frames of the clip and of the
    video); dtypes: 'float32' / 'bfloat16' (SOLVER.AMP); overrides: KEY VALUE config pairs;
    orig_scale: the video's original size = scale x size (what masks are upsampled to and encoded at).

    Returns {'env': device, torch, config, flags, ...; 'rows': one dict per case with train_ms,
    train_peak_gib, infer_ms, model_fps, pipeline_fps, ... and 'breakdown' (and 'profile' tables)}.
    """
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"dtypes: unknown {bad}; expected some of {list(DTYPES)}")
    parsed = [parse_size(s) for s in sizes]
    if not parsed or not dtypes:
        raise ValueError("run_benchmark: give at least one size and one dtype")
    if orig_scale <= 0:
        raise ValueError(f"orig_scale must be > 0, got {orig_scale}")
    for name, value in (("iters", iters), ("pipeline_frames", pipeline_frames), ("pipeline_videos", pipeline_videos),
                        ("breakdown_iters", breakdown_iters), ("profile_iters", profile_iters)):
        if int(value) < 1:
            raise ValueError(f"run_benchmark: {name} must be >= 1, got {value}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {dev} requested but CUDA is not available")
    if tf32:
        overrides = list(overrides) + ["TF32", "True"]
    # checked before any case runs, so a bad config or override fails at once
    base_cfg = _case_config(config_file, overrides, "float32")
    ncls = resolve_num_classes(base_cfg, num_classes)
    rows, skipped = [], []
    with tf32_mode(bool(base_cfg.TF32)) as flags:
        for dname in dtypes:
            if dname == "bfloat16" and dev.type != "cuda":
                # torchvision's deform_conv2d (mask head) has no bfloat16 CPU kernel and no CPU autocast rule
                skipped.append("bfloat16: needs CUDA (torchvision deform_conv2d has no bfloat16 CPU kernel)")
                if verbose:
                    print(f"skipped {skipped[-1]}", flush=True)
                continue
            cfg = _case_config(config_file, overrides, dname)
            t_len = int(cfg.MODEL.DEVIS.NUM_FRAMES)
            for size in parsed:
                setup = build_setup(cfg, ncls, dev, seed)
                samples, targets = synthetic_clip(t_len, size, num_instances, ncls, seed,
                                                  bool(cfg.INPUT.DEVIS.CREATE_BBX_FROM_MASK))
                samples = NestedTensor(samples.tensors.to(dev), samples.mask.to(dev))
                targets = [{k: (v.to(dev) if isinstance(v, Tensor) else v) for k, v in t.items()} for t in targets]
                row = {"case": f"T={t_len} K={int(targets[0]['num_trajectories'])}", "dtype": dname,
                       "size": _size_name(size), "frames": t_len,
                       "instances": int(targets[0]["num_trajectories"])}
                row.update(time_train(setup, samples, targets, iters, warmup))
                row.update(time_inference(setup, samples.tensors, iters, warmup))
                orig = (round(size[0] * orig_scale), round(size[1] * orig_scale))
                video = synthetic_video(pipeline_frames, size, num_instances, seed + 1)
                row.update(time_pipeline(setup, video, orig, pipeline_videos, warmup=1))
                row["breakdown"] = stage_breakdown(setup, samples, targets, breakdown_iters)
                if profile:
                    row["profile"], busy = profile_tables(setup, samples, targets, profile_iters)
                    row.update(busy)
                rows.append(row)
                if verbose:
                    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                           if k not in ("breakdown", "profile")}, flush=True)
                del setup, samples, targets, video
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.machine()})"
    env = {"device": name,
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "config": str(config_file), "overrides": list(overrides), "num_classes": ncls, "iters": iters,
           "warmup": warmup, "pipeline_videos": pipeline_videos, "orig_scale": orig_scale,
           "attention_backend": str(base_cfg.MODEL.ATTENTION_BACKEND), "tf32_flag": bool(base_cfg.TF32), **flags,
           "skipped": skipped, "reference": REFERENCE, "targets": TARGETS}
    return {"env": env, "rows": rows}


def _fmt(v, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _has_reference(row: dict) -> bool:
    return row["size"] == REFERENCE["size"] and row["frames"] == REFERENCE["frames"]


TABLE_COLUMNS = ("case", "dtype", "size", "train ms", "train peak GiB", "infer ms/clip", "model fps",
                 "pipeline fps", "train × faster than ref", "peak / ref", "model fps / ref")


def format_table(results: dict) -> str:
    """Markdown table of the rows; the ratio columns compare with the official float32 reference
    (T=6, 360x640) and are filled for rows of that size and clip length (both dtypes)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in results["rows"]:
        ref = _has_reference(r)
        peak = r.get("train_peak_gib")
        cells = [r["case"], r["dtype"], r["size"], _fmt(r["train_ms"]), _fmt(peak, 2), _fmt(r["infer_ms"]),
                 _fmt(r["model_fps"]), _fmt(r["pipeline_fps"]),
                 _fmt(REFERENCE["train_ms"] / r["train_ms"], 2) if ref else "–",
                 _fmt(peak / REFERENCE["train_peak_gib"], 2) if ref and peak is not None else "–",
                 _fmt(r["model_fps"] / REFERENCE["model_fps"], 2) if ref else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_targets(results: dict) -> str:
    """One line per reference-size row: each issue-8 target and whether it is met."""
    out = []
    for r in results["rows"]:
        if not _has_reference(r):
            continue
        checks = [("train", r["train_ms"], "<=", TARGETS["train_ms"], "ms"),
                  ("peak", r["train_peak_gib"], "<=", TARGETS["train_peak_gib"], "GiB"),
                  ("model", r["model_fps"], ">=", TARGETS["model_fps"], "fps"),
                  ("pipeline", r["pipeline_fps"], ">=", TARGETS["pipeline_fps"], "fps")]
        parts = []
        for name, value, op, bound, unit in checks:
            if value is None:
                parts.append(f"{name} – (no GPU)")
                continue
            ok = value <= bound if op == "<=" else value >= bound
            parts.append(f"{name} {value:.2f} {unit} ({op} {bound:g}: {'met' if ok else 'NOT met'})")
        out.append(f"{r['dtype']} {r['size']}: " + "; ".join(parts))
    return "\n".join(out) if out else "(no row at the reference size 360x640, T=6)"


def format_gpu_busy(results: dict) -> str:
    """Markdown table: per case, the GPU's busy ms per training iteration and per inference clip (from
    the profiler run, ``--profile``) next to the measured ms; '' when no row has them (CPU, no profile).
    Busy well below measured means the host, not the GPU, sets the pace."""
    rows = [r for r in results["rows"] if "train_gpu_busy_ms" in r]
    if not rows:
        return ""
    lines = ["| case | dtype | size | train GPU busy ms | train ms | infer GPU busy ms | infer ms |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['dtype']} | {r['size']} | {_fmt(r['train_gpu_busy_ms'])} | "
                     f"{_fmt(r['train_ms'])} | {_fmt(r['inference_gpu_busy_ms'])} | {_fmt(r['infer_ms'])} |")
    return "\n".join(lines)


def format_breakdown(results: dict, kind: str = "train") -> str:
    """Markdown table: the stages of ``kind`` ('train' or 'inference') in ms, one column per case."""
    rows = [r for r in results["rows"] if "breakdown" in r]
    if not rows:
        return "(no breakdown)"
    stages = STAGES_TRAIN if kind == "train" else STAGES_INFER
    head = "| stage | " + " | ".join(f"{r['dtype']} {r['size']}" for r in rows) + " |"
    lines = [head, "|" + "---|" * (len(rows) + 1)]
    for s in stages:
        lines.append(f"| {s} | " + " | ".join(_fmt(r["breakdown"][kind][s], 2) for r in rows) + " |")
    lines.append("| **sum** | " + " | ".join(_fmt(sum(r["breakdown"][kind].values()), 2) for r in rows) + " |")
    return "\n".join(lines)


def save_results(results: dict, path) -> None:
    """Write results as JSON atomically."""
    import json

    atomic_write_text(path, json.dumps(results, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``--out F [--sizes ...] [--dtypes ...] [--iters N] [--profile] [--tf32]
    [--config F] [KEY VALUE ...]``; prints the breakdown, the targets and, last, the table."""
    ap = argparse.ArgumentParser(prog="python -m devis_core.benchmarks.model", description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the results JSON here")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    ap.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help="comma-separated HxW")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated: float32, bfloat16")
    ap.add_argument("--iters", type=int, default=10, help="timed iterations (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--pipeline-frames", type=int, default=36, help="frames of the synthetic video")
    ap.add_argument("--pipeline-videos", type=int, default=2, help="timed runs of the video (median)")
    ap.add_argument("--orig-scale", type=float, default=1.0,
                    help="original video size = scale x size (2 emulates 720x1280 videos run at 360x640)")
    ap.add_argument("--breakdown-iters", type=int, default=3, help="iterations of the stage breakdown (median)")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler top-op tables")
    ap.add_argument("--profile-iters", type=int, default=3, help="iterations under the profiler")
    ap.add_argument("--tf32", action="store_true", help="shortcut for the override TF32 True (TF32 in float32 matmuls and cuDNN "
                    "convolutions)")
    ap.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    ap.add_argument("--num-classes", type=int, help="class logits (default: the training dataset's, 40 for YT-VIS)")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    a = ap.parse_args(argv)
    if len(a.opts) % 2:
        ap.error(f"overrides must be KEY VALUE pairs, got {a.opts}")
    try:
        sizes = [s for s in a.sizes.split(",") if s]
        for s in sizes:
            parse_size(s)
    except ValueError as err:
        ap.error(f"--sizes: {err}")
    dtypes = [d for d in a.dtypes.split(",") if d]
    res = run_benchmark(a.config, a.opts, sizes, dtypes, a.iters, a.warmup, a.pipeline_frames, a.pipeline_videos,
                        a.orig_scale, breakdown_iters=a.breakdown_iters, profile=a.profile,
                        profile_iters=a.profile_iters, tf32=a.tf32, device=a.device, num_classes=a.num_classes)
    if a.out:
        save_results(res, a.out)
    env = res["env"]
    if a.profile:
        for r in res["rows"]:
            for name, table in r["profile"].items():
                print(f"\n## profile {r['dtype']} {r['size']}: {name}\n{table}")
        busy = format_gpu_busy(res)
        if busy:
            print("\n## GPU busy (profiler) against measured time\n" + busy)
    print("\n## training iteration by stage (ms, median)\n" + format_breakdown(res, "train"))
    print("\n## per-clip inference by stage (ms, median)\n" + format_breakdown(res, "inference"))
    print("\n## issue 8 targets\n" + format_targets(res))
    print(f"\ndevice: {env['device']}; torch {env['torch']}; TF32 matmul {env['matmul_tf32']}, cuDNN "
          f"{env['cudnn_tf32']}; config {env['config']} {' '.join(env['overrides'])}"
          + (f"; saved {a.out}" if a.out else ""))
    print(f"reference (official code, H100, float32, T=6, 360x640): train {REFERENCE['train_ms']:.0f} ms, "
          f"{REFERENCE['train_peak_gib']} GiB; inference {REFERENCE['infer_ms']:.0f} ms/clip, "
          f"{REFERENCE['model_fps']} fps")
    print(format_table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
