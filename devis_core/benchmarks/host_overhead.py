"""Host (Python + dispatcher) overhead of a DeVIS training iteration and of an inference clip, per stage.

A training iteration is the real :func:`devis_core.engine.train_one_epoch` over preloaded synthetic
batches; an inference clip is the real :func:`devis_core.inference.infer_video` (model + tracker) on a
random video. Stages are attributed by module hooks and wrappers installed only here: a stage's numbers
exclude the stages nested in it (the matcher runs inside the model forward, for instance). Two passes:
one timed (host milliseconds: ``perf_counter`` without extra synchronisation, so on a GPU it is the time
the host spends issuing work plus any wait a sync forces) and one counting dispatched aten ops (a
``TorchDispatchMode``, too slow to time under) and the ops that force a device-to-host sync on a GPU.

Run ``python -m devis_core.benchmarks.host_overhead --config synthetic/devis_synthetic_learn.yaml
--size 48x80`` (``--device cuda`` on a GPU, ``--help`` for options); it prints one table per pass kind.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
import time
from collections import Counter, defaultdict
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator, Sequence
from unittest import mock

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from devis_core import engine, inference, tracking
from devis_core.config import load_config
from devis_core.criterion import build_criterion
from devis_core.matcher import match_layers
from devis_core.models import build_model
from devis_core.models import devis as devis_module
from devis_core.models.nested import NestedTensor
from devis_core.optim import build_optimizer

__all__ = ["StageRecorder", "synthetic_clip", "measure_training", "measure_inference", "format_table", "main"]

TRAIN_STAGES = ("backbone", "input_proj+flatten", "encoder", "decoder", "heads", "matcher", "mask_head",
                "loss_labels", "loss_boxes", "loss_masks", "criterion (other)", "backward", "clip_grad_norm",
                "optimizer.step", "loop (other)")
INFER_STAGES = ("backbone", "input_proj+flatten", "encoder", "decoder", "heads", "clip_topk", "mask_head",
                "tracker.add_clip", "tracker.finish", "loop (other)")

# Ops that make the host wait for the device on a GPU (values read back, data-dependent output sizes).
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_dim",
             "unique_consecutive", "is_nonzero", "equal"}


class StageRecorder:
    """Exclusive host time and (optionally) dispatched aten ops per named stage.

    ``push(name)`` / ``pop()`` nest: time and ops go to the innermost open stage; ``base`` collects
    whatever runs outside every stage.
    """

    def __init__(self, base: str):
        self.base = base
        self.stack = [base]
        self.seconds: dict[str, float] = defaultdict(float)
        self.ops: dict[str, Counter] = defaultdict(Counter)
        self.syncs: dict[str, int] = defaultdict(int)
        self._t = time.perf_counter()

    def _charge(self) -> None:
        now = time.perf_counter()
        self.seconds[self.stack[-1]] += now - self._t
        self._t = now

    def push(self, name: str) -> None:
        self._charge()
        self.stack.append(name)

    def pop(self) -> None:
        self._charge()
        self.stack.pop()

    def restart(self) -> None:
        """Forget everything recorded so far (after warm-up)."""
        self.seconds.clear()
        self.ops.clear()
        self.syncs.clear()
        self._t = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.push(name)
        try:
            yield
        finally:
            self.pop()

    def wrap(self, fn: Callable, name: str) -> Callable:
        """``fn`` run inside stage ``name``."""
        def staged(*args, **kwargs):
            with self.stage(name):
                return fn(*args, **kwargs)
        return staged

    def hook_module(self, module: torch.nn.Module, name: str) -> list:
        """Forward hooks that open stage ``name`` around every forward of ``module``; returns the handles."""
        return [module.register_forward_pre_hook(lambda *_: self.push(name)),
                module.register_forward_hook(lambda *_: self.pop())]

    def record_op(self, name: str, is_sync: bool) -> None:
        top = self.stack[-1]
        self.ops[top][name] += 1
        if is_sync:
            self.syncs[top] += 1


class _OpCounter(TorchDispatchMode):
    """Counts every aten op reaching the dispatcher's Python key (after autograd and autocast)."""

    def __init__(self, recorder: StageRecorder, cpu_run: bool):
        super().__init__()
        self.recorder = recorder
        self.cpu_run = cpu_run

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.recorder.record_op(name, _is_sync(name, args, kwargs, self.cpu_run))
        return func(*args, **kwargs)


def _is_sync(name: str, args, kwargs, cpu_run: bool) -> bool:
    """Would this op make the host wait for an accelerator: a value read back or a data-dependent size
    from a device tensor, or a copy from device into host memory (``.cpu()``, ``.tolist()``, ...).
    In a CPU run every value read / data-dependent op counts (it would sync were the model on a GPU)."""
    if name in _SYNC_OPS:
        return cpu_run or any(isinstance(a, Tensor) and a.device.type != "cpu" for a in args)
    if name == "_to_copy" and args and isinstance(args[0], Tensor):
        dev = kwargs.get("device")
        return args[0].device.type != "cpu" and dev is not None and torch.device(dev).type == "cpu"
    if name == "copy_" and len(args) >= 2 and isinstance(args[0], Tensor) and isinstance(args[1], Tensor):
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


@contextmanager
def _counting(recorder: StageRecorder, device: torch.device) -> Iterator[None]:
    with _OpCounter(recorder, cpu_run=device.type == "cpu"):
        yield


# ------------------------------------------------------------------------------------------------
# inputs


def synthetic_clip(num_frames: int, size: tuple[int, int], num_instances: int, seed: int = 0,
                   device: torch.device | str = "cpu") -> tuple[NestedTensor, list[dict]]:
    """One training clip in the model's target format.

    Returns (NestedTensor frames (T, 3, H, W) + all-False mask (T, H, W), [target]) with the target
    instance-major (entry n*T + t): boxes (N*T, 4) normalised cx, cy, w, h, labels (N*T,) int64,
    valid (N*T,) bool, masks (N*T, H, W) bool (the boxes' rectangles), size / orig_size (2,). The last
    instance is absent on the last frame (filler box of size 1e-6, empty mask), as the loader makes it.
    """
    g = torch.Generator().manual_seed(seed)
    h, w = size
    t_len, n = num_frames, num_instances
    frames = torch.randn(t_len, 3, h, w, generator=g)
    centre = 0.3 + 0.4 * torch.rand(n, 1, 2, generator=g) + 0.02 * torch.arange(t_len)[None, :, None]
    extent = 0.15 + 0.25 * torch.rand(n, 1, 2, generator=g).expand(n, t_len, 2)
    boxes = torch.cat([centre, extent], -1).reshape(n * t_len, 4)
    valid = torch.ones(n * t_len, dtype=torch.bool)
    if n:
        valid[-1] = False
        boxes[-1, 2:] = 1e-6
    masks = torch.zeros(n * t_len, h, w, dtype=torch.bool)
    for i, (cx, cy, bw, bh) in enumerate(boxes.tolist()):
        if valid[i]:
            masks[i, int((cy - bh / 2) * h):int((cy + bh / 2) * h), int((cx - bw / 2) * w):int((cx + bw / 2) * w)] = True
    labels = torch.randint(0, 5, (n,), generator=g).repeat_interleave(t_len)
    target = {"boxes": boxes, "labels": labels, "valid": valid, "masks": masks,
              "size": torch.tensor(size), "orig_size": torch.tensor(size)}
    samples = NestedTensor(frames, torch.zeros(t_len, h, w, dtype=torch.bool))
    return engine.to_device(samples, [target], torch.device(device))


# ------------------------------------------------------------------------------------------------
# stage instrumentation


@contextmanager
def _model_stages(recorder: StageRecorder, model) -> Iterator[None]:
    """Stages inside the DeVIS model: backbone, encoder, decoder, heads, mask head, input projections."""
    detr = model.def_detr
    handles = []
    handles += recorder.hook_module(detr.backbone, "backbone")
    handles += recorder.hook_module(detr.transformer.encoder, "encoder")
    handles += recorder.hook_module(detr.transformer.decoder, "decoder")
    handles += recorder.hook_module(model.bbox_attention, "mask_head")
    handles += recorder.hook_module(model.mask_head, "mask_head")
    try:
        with ExitStack() as stack:
            stack.enter_context(mock.patch.object(detr, "forward_features",
                                                  recorder.wrap(detr.forward_features, "input_proj+flatten")))
            stack.enter_context(mock.patch.object(detr, "predict", recorder.wrap(detr.predict, "heads")))
            yield
    finally:
        for h in handles:
            h.remove()


def _summary(recorder: StageRecorder, stages: Sequence[str], per: int) -> dict[str, dict]:
    out = {}
    names = list(stages) + sorted(set(recorder.seconds) | set(recorder.ops) - set(stages))
    for name in names:
        out[name] = {"ops": sum(recorder.ops.get(name, {}).values()) / per,
                     "syncs": recorder.syncs.get(name, 0) / per,
                     "host_ms": 1000.0 * recorder.seconds.get(name, 0.0) / per}
    return out


def _merge(counted: dict, timed: dict) -> dict:
    """Op / sync counts of the counting pass with host ms of the timed pass, per stage."""
    return {k: {"ops": counted[k]["ops"], "syncs": counted[k]["syncs"], "host_ms": timed.get(k, {}).get("host_ms", 0.0)}
            for k in counted}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(run, recorder, dev, warmup: int, iters: int, count_iters: int, profile, stages, units: int):
    """Warm up, then time ``run(iters)`` (host ms per stage, optionally under cProfile ``profile``) and
    count ops / syncs over ``run(count_iters)``; ``units`` = timed units per iteration (clips of a
    video). Returns (run's last result, wall s per unit, timed summary, counted summary)."""
    run(warmup)
    _synchronize(dev)
    recorder.restart()
    t0 = time.perf_counter()
    if profile is not None:
        profile.enable()
    result = run(iters)
    if profile is not None:
        profile.disable()
    _synchronize(dev)
    wall = (time.perf_counter() - t0) / (iters * units)
    timed = _summary(recorder, stages, iters * units)
    recorder.restart()
    with _counting(recorder, dev):
        run(count_iters)
    return result, wall, timed, _summary(recorder, stages, count_iters * units)


def _build(config: str, overrides: Sequence[str], num_classes: int, device: torch.device, amp: bool | None,
           fused_adamw: bool = False):
    # SOLVER.AMP is what training and infer_video read for bfloat16 autocast.
    cfg = load_config(config, list(overrides) + ([] if amp is None else ["SOLVER.AMP", str(bool(amp))])
                      + (["SOLVER.FUSED_ADAMW", "True"] if fused_adamw else []))
    if cfg.DATASETS.TYPE != "vis":
        raise ValueError(f"{config}: DATASETS.TYPE is {cfg.DATASETS.TYPE!r}; this benchmark measures DeVIS "
                         "('vis') configs")
    torch.manual_seed(0)
    model = build_model(cfg, num_classes, load_weights=False).to(device)
    return cfg, model


def measure_training(config: str, overrides: Sequence[str] = (), size: tuple[int, int] = (48, 80),
                     num_instances: int = 3, iters: int = 5, count_iters: int = 1, warmup: int = 2,
                     device: str = "cpu", num_classes: int = 40, amp: bool | None = None,
                     fused_adamw: bool = False, profile: cProfile.Profile | None = None) -> dict:
    """Per-stage ops / syncs / host ms of one training iteration (``train_one_epoch`` on a preloaded batch).

    amp: bfloat16 autocast (default SOLVER.AMP of the config); fused_adamw: SOLVER.FUSED_ADAMW. Returns {'stages': {stage: {ops, syncs,
    host_ms}}, 'wall_ms': synchronised wall time per iteration, 'top_ops': Counter of op names,
    'loss': last loss}.
    """
    dev = torch.device(device)
    cfg, model = _build(config, overrides, num_classes, dev, amp, fused_adamw)
    amp = bool(cfg.SOLVER.AMP)
    criterion = build_criterion(cfg, num_classes)
    optimizer = build_optimizer(cfg, model)
    if amp:
        engine.prepare_for_amp(model, criterion)
    batch = synthetic_clip(cfg.MODEL.DEVIS.NUM_FRAMES, size, num_instances, device=dev)
    recorder = StageRecorder("loop (other)")

    def epoch(n: int) -> dict:
        return engine.train_one_epoch(model, criterion, [batch] * n, optimizer, dev, 0,
                                      cfg.SOLVER.GRAD_CLIP_MAX_NORM, amp=amp)

    with ExitStack() as stack:
        stack.enter_context(_model_stages(recorder, model))
        for owner in (model, criterion):
            stack.enter_context(mock.patch.object(owner, "matcher", _StagedMatcher(recorder, owner.matcher)))
        for loss in ("loss_labels", "loss_boxes", "loss_masks"):
            stack.enter_context(mock.patch.object(criterion, loss, recorder.wrap(getattr(criterion, loss), loss)))
        stack.enter_context(mock.patch.object(criterion, "forward", recorder.wrap(criterion.forward,
                                                                                  "criterion (other)")))
        stack.enter_context(mock.patch.object(torch.autograd, "backward",
                                              recorder.wrap(torch.autograd.backward, "backward")))
        stack.enter_context(mock.patch.object(torch.nn.utils, "clip_grad_norm_",
                                              recorder.wrap(torch.nn.utils.clip_grad_norm_, "clip_grad_norm")))
        pre = optimizer.register_step_pre_hook(lambda *_: recorder.push("optimizer.step"))
        post = optimizer.register_step_post_hook(lambda *_: recorder.pop())
        try:
            stats, wall, timed, counted = _measure(epoch, recorder, dev, warmup, iters, count_iters, profile,
                                                   TRAIN_STAGES, 1)
        finally:
            pre.remove()
            post.remove()
    top = Counter()
    for c in recorder.ops.values():
        top.update(c)
    stages = _merge(counted, timed)
    return {"stages": stages, "wall_ms": 1000.0 * wall, "top_ops": Counter({k: v / count_iters for k, v in top.items()}),
            "stage_ops": {k: Counter({o: n / count_iters for o, n in c.items()}) for k, c in recorder.ops.items()},
            "loss": stats.get("loss", math.nan)}


def measure_inference(config: str, overrides: Sequence[str] = (), size: tuple[int, int] = (48, 80),
                      num_clips: int = 3, iters: int = 3, count_iters: int = 1, warmup: int = 1,
                      device: str = "cpu", num_classes: int = 40, amp: bool | None = None,
                      profile: cProfile.Profile | None = None) -> dict:
    """Per-stage ops / syncs / host ms per clip of :func:`devis_core.inference.infer_video` (model inference
    and clip tracker; amp: SOLVER.AMP, default the config's) on a random video of ``num_clips`` clips.
    Returns the dict of :func:`measure_training` (per clip) without 'loss'."""
    dev = torch.device(device)
    cfg, model = _build(config, overrides, num_classes, dev, amp)
    t_len, stride = cfg.MODEL.DEVIS.NUM_FRAMES, cfg.TEST.CLIP_TRACKING.STRIDE
    length = t_len + stride * (num_clips - 1)
    clips, _ = tracking.partition_clips(length, t_len, stride)
    g = torch.Generator().manual_seed(0)
    video = torch.randn(length, 3, *size, generator=g)
    recorder = StageRecorder("loop (other)")

    def run(n: int) -> None:
        for _ in range(n):
            inference.infer_video(model, lambda ids: video[list(ids)], 1, length, size, cfg, dev)

    with ExitStack() as stack:
        stack.enter_context(_model_stages(recorder, model))
        stack.enter_context(mock.patch.object(devis_module, "clip_topk", recorder.wrap(devis_module.clip_topk,
                                                                                       "clip_topk")))
        stack.enter_context(mock.patch.object(tracking.ClipTracker, "add_clip",
                                              _unbound(recorder, tracking.ClipTracker.add_clip, "tracker.add_clip")))
        stack.enter_context(mock.patch.object(tracking.ClipTracker, "finish",
                                              _unbound(recorder, tracking.ClipTracker.finish, "tracker.finish")))
        _, wall, timed, counted = _measure(run, recorder, dev, warmup, iters, count_iters, profile,
                                           INFER_STAGES, len(clips))
    top = Counter()
    for c in recorder.ops.values():
        top.update(c)
    stages = _merge(counted, timed)
    per = count_iters * len(clips)
    return {"stages": stages, "wall_ms": 1000.0 * wall, "top_ops": Counter({k: v / per for k, v in top.items()}),
            "stage_ops": {k: Counter({o: n / per for o, n in c.items()}) for k, c in recorder.ops.items()}}


class _StagedMatcher:
    """A matcher run inside stage 'matcher', keeping its batched ``match_layers`` (a plain wrapper function
    would make ``devis_core.matcher.match_layers`` fall back to one call per layer)."""

    def __init__(self, recorder: StageRecorder, matcher):
        self.recorder, self.matcher = recorder, matcher

    def __call__(self, outputs, targets):
        with self.recorder.stage("matcher"):
            return self.matcher(outputs, targets)

    def match_layers(self, layer_outputs, targets):
        with self.recorder.stage("matcher"):
            return match_layers(self.matcher, layer_outputs, targets)


def _unbound(recorder: StageRecorder, fn: Callable, name: str) -> Callable:
    # A plain function (not a bound method) so that it binds to each tracker instance as a method.
    def staged(self, *args, **kwargs):
        with recorder.stage(name):
            return fn(self, *args, **kwargs)
    return staged


# ------------------------------------------------------------------------------------------------
# output


def format_table(title: str, result: dict, top: int = 0, stage_top: int = 0) -> str:
    """Text table: stage, ops, device->host syncs, host ms, share of host time; then a total row,
    (``top`` > 0) the most frequent aten ops and (``stage_top`` > 0) the most frequent ops per stage."""
    stages = result["stages"]
    total_ms = sum(s["host_ms"] for s in stages.values())
    lines = [title, f"{'stage':<20}{'ops':>9}{'syncs':>8}{'host ms':>11}{'share':>8}"]
    for name, s in stages.items():
        if not (s["ops"] or s["host_ms"] >= 0.005):
            continue
        share = 100.0 * s["host_ms"] / total_ms if total_ms else 0.0
        lines.append(f"{name:<20}{s['ops']:>9.0f}{s['syncs']:>8.0f}{s['host_ms']:>11.2f}{share:>7.1f}%")
    lines.append(f"{'total':<20}{sum(s['ops'] for s in stages.values()):>9.0f}"
                 f"{sum(s['syncs'] for s in stages.values()):>8.0f}{total_ms:>11.2f}")
    lines.append(f"wall per unit (synchronised): {result['wall_ms']:.2f} ms")
    if top:
        common = ", ".join(f"{k} {v:.0f}" for k, v in result["top_ops"].most_common(top))
        lines.append(f"most frequent ops: {common}")
    for name, ops in result.get("stage_ops", {}).items() if stage_top else ():
        lines.append(f"  {name}: " + ", ".join(f"{k} {v:.0f}" for k, v in ops.most_common(stage_top)))
    return "\n".join(lines)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size: expected HxW (e.g. 48x80), got {text!r}") from None
    if h < 32 or w < 32:
        raise argparse.ArgumentTypeError(f"--size: frames must be at least 32x32 (five strided stages), got {text!r}")
    return h, w


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="synthetic/devis_synthetic_learn.yaml")
    parser.add_argument("--size", type=_parse_size, default=(48, 80), help="frame size HxW")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--instances", type=int, default=3, help="ground-truth instances of the training clip")
    parser.add_argument("--iters", type=int, default=5, help="timed training iterations (inference: videos)")
    parser.add_argument("--num-classes", type=int, default=40)
    parser.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                        help="bfloat16 autocast: 'auto' = the config's SOLVER.AMP on CUDA, off on the CPU "
                             "(torchvision's CPU deform_conv2d has no bfloat16 kernel)")
    parser.add_argument("--fused-adamw", action="store_true", help="training with SOLVER.FUSED_ADAMW True (CUDA)")
    parser.add_argument("--only", choices=("train", "inference", "both"), default="both")
    parser.add_argument("--top-ops", type=int, default=12, help="print the N most frequent aten ops")
    parser.add_argument("--stage-ops", type=int, default=0, help="print the N most frequent ops of every stage")
    parser.add_argument("--cprofile", type=int, default=0, help="print the N functions with the most own time")
    parser.add_argument("opts", nargs="*", help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    amp = (None if torch.device(args.device).type == "cuda" else False) if args.amp == "auto" else args.amp == "on"
    common = dict(overrides=args.opts, size=args.size, device=args.device, num_classes=args.num_classes, amp=amp)
    header = (f"{args.config} | frames {args.size[0]}x{args.size[1]} | device {args.device} | amp {args.amp} | "
              f"torch {torch.__version__}")
    print(header)
    for kind in ("train", "inference"):
        if args.only not in (kind, "both"):
            continue
        profile = cProfile.Profile() if args.cprofile else None
        if kind == "train":
            res = measure_training(args.config, num_instances=args.instances, iters=args.iters, profile=profile,
                                   fused_adamw=args.fused_adamw, **common)
            title = f"training iteration ({args.instances} instances; loss {res['loss']:.3f})"
        else:
            res = measure_inference(args.config, iters=max(1, args.iters // 2), profile=profile, **common)
            title = "inference, per clip (infer_video: DeVIS.inference + clip tracker)"
        print()
        print(format_table(title, res, args.top_ops, args.stage_ops))
        if profile is not None:
            buf = io.StringIO()
            pstats.Stats(profile, stream=buf).sort_stats("tottime").print_stats(args.cprofile)
            print(buf.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
