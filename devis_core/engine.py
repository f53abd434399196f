"""Training and evaluation loops shared by the three models (the config decides what runs, not the loop)."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from devis_core.distributed import all_true, get_world_size, is_main_process, reduce_mean
from devis_core.logging_utils import TrainingLog, progress
from devis_core.matcher import match_layers
from devis_core.models.nested import NestedTensor


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite (and SOLVER.SKIP_NONFINITE_STEPS is off)."""


def to_device(samples: NestedTensor, targets: list[dict], device: torch.device) -> tuple[NestedTensor, list[dict]]:
    """Move a batch (NestedTensor tensors (B, 3, H, W) + mask (B, H, W), B target dicts) to ``device``;
    non-tensor target entries (file names, ...) stay as they are."""
    samples = NestedTensor(samples.tensors.to(device, non_blocking=True), samples.mask.to(device, non_blocking=True))
    targets = [{k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in t.items()}
               for t in targets]
    return samples, targets


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on ``device`` when ``enabled`` (SOLVER.AMP); a no-op context otherwise.

    bfloat16 keeps float32's exponent range, so no loss scaling is needed, unlike float16.
    """
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class Float32Matcher:
    """Runs a Hungarian matcher outside autocast on float32 predictions.

    The mask models call their matcher inside ``forward``; under bfloat16 autocast its cost matrix would be
    bfloat16, which scipy cannot read and which would round costs that decide the assignment.
    """

    def __init__(self, matcher):
        self.matcher = matcher

    def __call__(self, outputs: dict, targets: list[dict]):
        return self.match_layers([outputs], targets)[0]

    def match_layers(self, layer_outputs: list[dict], targets: list[dict]):
        """Indices of several decoder layers (see ``devis_core.matcher.match_layers``)."""
        device_type = layer_outputs[0]["pred_logits"].device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return match_layers(self.matcher, to_float(list(layer_outputs)), targets)


def prepare_for_amp(model: nn.Module, criterion: nn.Module) -> None:
    """Wrap the matchers of ``model`` (when it has one) and ``criterion`` in :class:`Float32Matcher`."""
    for owner in (model, criterion):
        m = getattr(owner, "matcher", None)
        if m is not None and not isinstance(m, Float32Matcher):
            owner.matcher = Float32Matcher(m)


def compute_losses(model: nn.Module, criterion: nn.Module, samples: NestedTensor, targets: list[dict],
                   amp: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward and criterion of one batch. Returns (weighted total loss (), unweighted loss terms).

    The criterion runs in float32 outside autocast: the matcher's costs and the focal / dice sums are
    where bfloat16's 8-bit mantissa would cost accuracy.
    """
    device = samples.tensors.device
    with autocast(device, amp):
        outputs = model(samples, targets)
    if amp:
        outputs = to_float(outputs)
    losses = criterion(outputs, targets)
    return criterion.total_loss(losses), losses


def to_float(obj):
    if isinstance(obj, Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: to_float(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_float(v) for v in obj)
    return obj


def _read_losses(loss: Tensor, losses: dict[str, Tensor], weight_dict: dict[str, float]) -> tuple[float, dict[str, float]]:
    """(total loss, {weighted term, class_error}) as Python floats, read from the device in ONE transfer
    (reading each of the ~30 terms separately costs a device sync each)."""
    names = [k for k in losses if k in weight_dict or k == "class_error"]
    values = [loss.detach()] + [losses[k].detach() for k in names]
    if len({v.dtype for v in values}) > 1:
        values = [v.double() for v in values]      # exact for every float dtype, so the same floats
    host = torch.stack(values).tolist()
    terms = {k: v * weight_dict[k] for k, v in zip(names, host[1:]) if k in weight_dict}
    if "class_error" in losses:
        terms["class_error"] = host[1 + names.index("class_error")]
    return host[0], terms


def train_one_epoch(model: nn.Module, criterion: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, max_norm: float = 0.1, *, amp: bool = False,
                    skip_nonfinite: bool = False, start_iteration: int = 0, num_iterations: int | None = None,
                    log: TrainingLog | None = None, log_interval: int = 100,
                    after_step: Callable[[int], None] | None = None) -> dict[str, float]:
    """One epoch (or its remainder) of training.

    ``loader`` yields (samples NestedTensor, targets list of dicts); ``start_iteration`` is the number of
    batches of this epoch already done (the loader must already skip them); ``num_iterations`` is the
    epoch's full length (for logging). Gradients are clipped to global L2 norm ``max_norm`` (0 = off).
    A non-finite loss on any rank raises :class:`NonFiniteLossError` before any weight changes, or, with
    ``skip_nonfinite``, skips that step on every rank. ``after_step(i)`` is called with the number of
    batches done after each step (mid-epoch checkpoints). Returns the epoch's mean weighted loss terms,
    ``loss``, ``lr``, ``grad_norm``, ``skipped_steps``, ``iterations`` and ``time_per_iter`` (rank-averaged).
    """
    model.train()
    criterion.train()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sums: dict[str, float] = {}
    done, skipped, i = 0, 0, start_iteration
    total = num_iterations
    t_start = time.perf_counter()
    bar = progress(loader, None if total is None else total - start_iteration, f"epoch {epoch}",
                   is_main_process())
    for samples, targets in bar:
        samples, targets = to_device(samples, targets, device)
        loss, losses = compute_losses(model, criterion, samples, targets, amp)
        value, step = _read_losses(loss, losses, criterion.weight_dict)
        if not all_true(math.isfinite(value), device):
            terms = {k: round(float(v.detach()), 4) for k, v in losses.items()}
            if not skip_nonfinite:
                raise NonFiniteLossError(
                    f"epoch {epoch}, iteration {i}: the loss is not finite on at least one rank (this rank: "
                    f"{value}; terms {terms}). Training stops; the last complete checkpoint in OUTPUT_DIR is "
                    "kept. Lower SOLVER.BASE_LR, check the data, or set SOLVER.SKIP_NONFINITE_STEPS True")
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            i += 1
            if log is not None:
                log.log({"kind": "skipped_step", "epoch": epoch, "iteration": i, "loss_terms": str(terms)})
            if after_step is not None:
                after_step(i)
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if max_norm > 0 else float("nan")
        optimizer.step()
        i += 1
        done += 1
        step.update(loss=value, grad_norm=grad_norm)
        for k, v in step.items():
            sums[k] = sums.get(k, 0.0) + v
        if log is not None and (done == 1 or i % max(1, log_interval) == 0):
            rec = reduce_mean({"train_loss": value}, device)
            rec.update(kind="train_iter", epoch=epoch, iteration=i, lr=optimizer.param_groups[0]["lr"],
                       grad_norm=grad_norm,
                       epoch_fraction=(i / total - 1.0) if total else 0.0)
            log.log(rec)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
        if after_step is not None:
            after_step(i)
    means = {k: v / max(done, 1) for k, v in sums.items()}
    means.update(skipped_steps=float(skipped), iterations=float(done),
                 time_per_iter=(time.perf_counter() - t_start) / max(done + skipped, 1))
    out = reduce_mean(means, device)
    out["lr"] = optimizer.param_groups[0]["lr"]
    out["world_size"] = get_world_size()
    return out


@torch.no_grad()
def validation_loss(model: nn.Module, criterion: nn.Module, loader: Iterable, device: torch.device,
                    amp: bool = False) -> dict[str, float]:
    """Mean weighted loss on batches in training format (model in eval mode, so no dropout and no mask
    auxiliary losses). Returns {'val_loss', 'val_<term>'...}, averaged over ranks; {} for an empty loader."""
    model.eval()
    criterion.eval()
    sums: dict[str, float] = {}
    n = 0
    for samples, targets in loader:
        samples, targets = to_device(samples, targets, device)
        loss, losses = compute_losses(model, criterion, samples, targets, amp)
        value, terms = _read_losses(loss, losses, criterion.weight_dict)
        for k, v in terms.items():
            sums[f"val_{k}"] = sums.get(f"val_{k}", 0.0) + v
        sums["val_loss"] = sums.get("val_loss", 0.0) + value
        n += 1
    if n == 0:
        return {}
    return reduce_mean({k: v / n for k, v in sums.items()}, device)


@torch.no_grad()
def evaluate_coco(model: nn.Module, criterion: nn.Module, postprocessors: dict, loader: Iterable, evaluator,
                  device: torch.device, amp: bool = False) -> dict[str, float]:
    """COCO box (and mask, when ``postprocessors`` has 'segm') AP on ``loader`` plus the validation loss of
    the same batches. Returns {'val_loss', ..., 'bbox_AP', 'bbox_AP50', ..., 'segm_AP', ..., 'AP'} where
    'AP' is the mask AP when masks are evaluated, else the box AP (what picks the best checkpoint)."""
    model.eval()
    criterion.eval()
    evaluator.reset()
    sums: dict[str, float] = {}
    n = 0
    for samples, targets in progress(loader, None, "eval", is_main_process()):
        samples, targets = to_device(samples, targets, device)
        with autocast(device, amp):
            outputs = model(samples, targets)
        outputs = to_float(outputs)
        losses = criterion(outputs, targets)
        sums["val_loss"] = sums.get("val_loss", 0.0) + float(criterion.total_loss(losses))
        n += 1
        orig = torch.stack([t["orig_size"] for t in targets])
        results = postprocessors["bbox"](outputs, orig)
        if "segm" in postprocessors:
            sizes = torch.stack([t["size"] for t in targets])
            results = postprocessors["segm"](results, outputs, orig, sizes)
        evaluator.process({int(t["image_id"]): {k: v.cpu() for k, v in r.items()} for t, r in zip(targets, results)})
    out = reduce_mean({k: v / max(n, 1) for k, v in sums.items()}, device)
    metrics = evaluator.evaluate()
    for iou_type, vals in metrics.items():
        for name, v in vals.items():
            out[f"{iou_type}_{name}"] = v
    out["AP"] = out["segm_AP"] if "segm_AP" in out else out["bbox_AP"]
    return out
