"""Hungarian matching of predictions to ground truth: per image (Deformable DETR) and per clip (DeVIS).

Both matchers share one cost, :func:`matching_cost`, written over a frame axis: an image is a clip of
one frame whose L1 cost sums the four coordinates, while the DeVIS clip matcher averages class, L1 and
GIoU costs over the T frames of a trajectory slot (spec §6.3). Only the bookkeeping of indices differs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou

# The official costs add 1e-8 inside the logs so that p = 0 or 1 gives a large finite cost.
_LOG_EPS = 1e-8


def focal_class_cost(prob: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal-loss classification cost of every prediction against every target, averaged over frames.

    prob: (..., T, Q, K) sigmoid class probabilities of Q predictions on T frames (leading axes, e.g.
    decoder layers, are batched). labels: (N, T) 0-based class of target n on frame t.
    Returns (..., Q, N): mean_t [alpha (1-p)^gamma (-log(p+1e-8)) - (1-alpha) p^gamma (-log(1-p+1e-8))]
    with p = prob[..., t, q, labels[n, t]].
    """
    pos = alpha * ((1 - prob) ** gamma) * (-(prob + _LOG_EPS).log())
    neg = (1 - alpha) * (prob ** gamma) * (-(1 - prob + _LOG_EPS).log())
    per_class = (pos - neg).transpose(-3, -2)                                 # (..., Q, T, K)
    index = labels.t().expand(*per_class.shape[:-1], labels.shape[0])         # (..., Q, T, N)
    return per_class.gather(-1, index).mean(-2)


def l1_box_cost(pred_boxes: Tensor, tgt_boxes: Tensor, coord_reduction: str = "sum") -> Tensor:
    """L1 box distance of every prediction to every target, averaged over frames.

    pred_boxes: (..., T, Q, 4) normalised cx, cy, w, h (leading axes batched). tgt_boxes: (N, T, 4) same
    format. coord_reduction: 'sum' over the 4 coordinates (image matcher, ``cdist(p=1)``) or 'mean'
    (DeVIS clip matcher: a quarter of the image scale).
    Returns (..., Q, N).
    """
    if coord_reduction not in ("sum", "mean"):
        raise ValueError(f"coord_reduction is {coord_reduction!r}, expected 'sum' or 'mean'")
    diff = (pred_boxes.transpose(-3, -2)[..., :, None, :, :] - tgt_boxes).abs()   # (..., Q, N, T, 4)
    per_frame = diff.sum(-1) if coord_reduction == "sum" else diff.mean(-1)
    return per_frame.mean(-1)


def giou_box_cost(pred_boxes: Tensor, tgt_boxes: Tensor) -> Tensor:
    """Negative epsilon-regularised GIoU of every prediction to every target, averaged over frames.

    pred_boxes: (..., T, Q, 4) normalised cx, cy, w, h (leading axes batched). tgt_boxes: (N, T, 4) same
    format. Returns (..., Q, N).
    """
    pred = box_cxcywh_to_xyxy(pred_boxes.transpose(-3, -2))[..., :, None, :, :]   # (..., Q, 1, T, 4)
    tgt = box_cxcywh_to_xyxy(tgt_boxes)                                           # (N, T, 4)
    # Unchecked: a malformed (NaN) prediction makes the cost non-finite, which _assign reports on the
    # host copy; checking here would cost two device syncs per call.
    return -generalized_box_iou(pred, tgt, check=False).mean(-1)


def matching_cost(prob: Tensor, pred_boxes: Tensor, labels: Tensor, tgt_boxes: Tensor,
                  cost_class: float, cost_bbox: float, cost_giou: float, focal_alpha: float = 0.25,
                  focal_gamma: float = 2.0, l1_coord_reduction: str = "sum") -> Tensor:
    """Weighted matching cost between Q prediction slots and N targets followed over T frames.

    prob: (..., T, Q, K) sigmoid probabilities; pred_boxes: (..., T, Q, 4) normalised cx, cy, w, h
    (leading axes, e.g. decoder layers, batched); labels: (N, T) 0-based classes; tgt_boxes: (N, T, 4)
    normalised cx, cy, w, h. Returns (..., Q, N) = cost_bbox·L1 + cost_class·class + cost_giou·(−GIoU_eps).
    """
    c_class = focal_class_cost(prob, labels, focal_alpha, focal_gamma)
    c_bbox = l1_box_cost(pred_boxes, tgt_boxes, l1_coord_reduction)
    c_giou = giou_box_cost(pred_boxes, tgt_boxes)
    return cost_bbox * c_bbox + cost_class * c_class + cost_giou * c_giou


def _assign(cost: np.ndarray, where: str) -> tuple[Tensor, Tensor]:
    """Optimal assignment of a (Q, N) host cost; returns (rows ascending, cols) as int64 tensors."""
    if not np.isfinite(cost).all():
        raise ValueError(f"{where}: the matching cost contains NaN or inf (predicted logits or boxes "
                         f"are not finite); expected finite outputs")
    rows, cols = linear_sum_assignment(cost)
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def _to_host(costs: Sequence[Tensor]) -> list[np.ndarray]:
    """Copy cost tensors of any shapes to the host in ONE transfer (each copy waits for the device)."""
    if not costs:
        return []
    flat = torch.cat([c.detach().reshape(-1) for c in costs]).cpu().numpy()
    out, start = [], 0
    for c in costs:
        out.append(flat[start:start + c.numel()].reshape(tuple(c.shape)))
        start += c.numel()
    return out


def _stack_layers(layer_outputs: Sequence[dict], key: str) -> Tensor:
    """(D, B, Q, X) from D layer dicts (no copy for a single layer)."""
    if len(layer_outputs) == 1:
        return layer_outputs[0][key][None]
    return torch.stack([o[key] for o in layer_outputs])


def match_layers(matcher, layer_outputs: Sequence[dict], targets: Sequence[dict]) -> list[list[tuple[Tensor, Tensor]]]:
    """Indices of several decoder layers against the same targets: one batched call when ``matcher``
    has ``match_layers`` (the matchers here), else one call per layer. Returns D lists of B pairs."""
    batched = getattr(matcher, "match_layers", None)
    if batched is not None:
        return batched(layer_outputs, targets)
    return [matcher(o, targets) for o in layer_outputs]


def _check_outputs(outputs: dict, targets: Sequence[dict]) -> None:
    for key in ("pred_logits", "pred_boxes"):
        if key not in outputs:
            raise KeyError(f"matcher: outputs have no {key!r}; expected keys pred_logits, pred_boxes")
    if outputs["pred_logits"].shape[0] != len(targets):
        raise ValueError(f"matcher: {outputs['pred_logits'].shape[0]} predictions in the batch but "
                         f"{len(targets)} target dicts")


class _LayerBatchedMatcher:
    """Shared entry points: ``__call__`` matches one output dict, ``match_layers`` the outputs of D
    decoder layers at once after checking them; subclasses implement ``_match_layers``."""

    def __call__(self, outputs: dict, targets: Sequence[dict]) -> list[tuple[Tensor, Tensor]]:
        """One output dict -> B pairs (pred_idx, tgt_idx); see the subclass for shapes."""
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(self, layer_outputs: Sequence[dict], targets: Sequence[dict]) -> list[list[tuple[Tensor, Tensor]]]:
        """``__call__`` for D decoder layers at once (one cost computation per image or clip over all
        layers, one device-to-host transfer). layer_outputs: D output dicts. Returns D lists of B pairs."""
        for outputs in layer_outputs:
            _check_outputs(outputs, targets)
        return self._match_layers(layer_outputs, targets)


class HungarianMatcher(_LayerBatchedMatcher):
    """One-to-one assignment of the Q queries of each image to its ground-truth objects.

    cost = cost_bbox·L1(cxcywh, summed over coords) + cost_class·focal cost + cost_giou·(−GIoU_eps);
    solved per image with scipy's ``linear_sum_assignment`` (spec §6.3).
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou are all 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def _match_layers(self, layer_outputs: Sequence[dict], targets: Sequence[dict]) -> list[list[tuple[Tensor, Tensor]]]:
        """Match each image's queries to its targets, for every layer.

        layer_outputs: D dicts {pred_logits (B, Q, K) class logits, pred_boxes (B, Q, 4) normalised cx, cy,
        w, h}. targets: B dicts with labels (N_b,) int64 0-based and boxes (N_b, 4) normalised cx, cy, w, h.
        Returns D lists of B pairs (pred_idx, tgt_idx), int64 of length min(Q, N_b), pred_idx ascending.
        """
        prob = _stack_layers(layer_outputs, "pred_logits").sigmoid()           # (D, B, Q, K)
        pred_boxes = _stack_layers(layer_outputs, "pred_boxes")               # (D, B, Q, 4)
        costs = [matching_cost(prob[:, b, None], pred_boxes[:, b, None], tgt["labels"][:, None],
                               tgt["boxes"][:, None].to(prob.dtype), self.cost_class, self.cost_bbox,
                               self.cost_giou, self.focal_alpha, self.focal_gamma, "sum")
                 for b, tgt in enumerate(targets)]                             # B x (D, Q, N_b)
        host = _to_host(costs)
        return [[_assign(host[b][d], f"HungarianMatcher, image {b}" + (f", layer entry {d}" if len(layer_outputs) > 1 else ""))
                 for b in range(len(targets))] for d in range(len(layer_outputs))]


class ClipHungarianMatcher(_LayerBatchedMatcher):
    """One assignment per clip between the N_q trajectory slots and the GT instances (DeVIS, spec §6.3).

    Predictions are frame-major (query index t·N_q + i); targets are instance-major (entry n·T + t)
    and carry every frame of every instance, absent frames with a filler box and the instance label.
    Class, L1 (mean over coords unless ``use_sum_l1``) and GIoU_eps costs are averaged over the T
    frames, absent ones included. Matched slot i ↔ instance n expands to the T pairs
    (t·N_q + i, n·T + t); whether a pair is present is read from the targets' ``valid`` flags.
    """

    def __init__(self, num_frames: int, cost_class: float = 1.0, cost_bbox: float = 5.0,
                 cost_giou: float = 2.0, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 use_sum_l1: bool = False):
        if num_frames < 1:
            raise ValueError(f"ClipHungarianMatcher: num_frames is {num_frames}, expected >= 1")
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("ClipHungarianMatcher: cost_class, cost_bbox and cost_giou are all 0")
        self.num_frames = num_frames
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.use_sum_l1 = use_sum_l1

    def _match_layers(self, layer_outputs: Sequence[dict], targets: Sequence[dict]) -> list[list[tuple[Tensor, Tensor]]]:
        """Match each clip's trajectory slots to its instances, for every layer.

        layer_outputs: D dicts {pred_logits (B, T·N_q, K), pred_boxes (B, T·N_q, 4)}, frame-major queries.
        targets: B dicts with labels (N·T,) 0-based and boxes (N·T, 4) normalised cx, cy, w, h,
        instance-major (entry n·T + t).
        Returns D lists of B pairs (pred_idx, tgt_idx) of length T·min(N_q, N): for each matched slot
        (slots ascending) its T frames, pred t·N_q + i and target n·T + t. Empty for a clip without
        instances (the official matcher returned slot 0 flagged invalid there: same losses).
        """
        t_len = self.num_frames
        b, num_queries, k = layer_outputs[0]["pred_logits"].shape
        if num_queries % t_len:
            raise ValueError(f"ClipHungarianMatcher: {num_queries} queries is not a multiple of "
                             f"num_frames={t_len}")
        n_q = num_queries // t_len
        d_len = len(layer_outputs)
        prob = _stack_layers(layer_outputs, "pred_logits").sigmoid().view(d_len, b, t_len, n_q, k)
        pred_boxes = _stack_layers(layer_outputs, "pred_boxes").view(d_len, b, t_len, n_q, 4)
        costs, clips = [], []
        for i, tgt in enumerate(targets):
            labels, boxes = tgt["labels"], tgt["boxes"]
            if labels.numel() % t_len:
                raise ValueError(f"ClipHungarianMatcher, clip {i}: {labels.numel()} target entries is "
                                 f"not a multiple of num_frames={t_len} (expected instance-major n·T + t)")
            n_inst = labels.numel() // t_len
            if n_inst:
                costs.append(matching_cost(prob[:, i], pred_boxes[:, i], labels.view(n_inst, t_len),
                                           boxes.view(n_inst, t_len, 4).to(prob.dtype), self.cost_class,
                                           self.cost_bbox, self.cost_giou, self.focal_alpha, self.focal_gamma,
                                           "sum" if self.use_sum_l1 else "mean"))   # (D, N_q, N)
                clips.append(i)
        host = dict(zip(clips, _to_host(costs)))
        frames = torch.arange(t_len, dtype=torch.int64)
        empty = torch.zeros(0, dtype=torch.int64)
        out = []
        for d in range(d_len):
            indices = []
            for i in range(len(targets)):
                if i not in host:
                    indices.append((empty, empty.clone()))
                    continue
                slots, inst = _assign(host[i][d], f"ClipHungarianMatcher, clip {i}" + (f", layer entry {d}" if d_len > 1 else ""))
                indices.append(((frames[None] * n_q + slots[:, None]).reshape(-1),
                                (inst[:, None] * t_len + frames[None]).reshape(-1)))
            out.append(indices)
        return out


def build_matcher(cfg):
    """The matcher the config asks for: the clip matcher for ``DATASETS.TYPE == 'vis'``, else per image.

    Reads MODEL.MATCHER.{CLASS_COST, BBX_L1_COST, BBX_GIOU_COST, USE_SUM_L1_DISTANCE},
    MODEL.LOSS.FOCAL_ALPHA and MODEL.DEVIS.NUM_FRAMES.
    """
    m = cfg.MODEL.MATCHER
    if cfg.DATASETS.TYPE == "vis":
        return ClipHungarianMatcher(cfg.MODEL.DEVIS.NUM_FRAMES, m.CLASS_COST, m.BBX_L1_COST,
                                    m.BBX_GIOU_COST, cfg.MODEL.LOSS.FOCAL_ALPHA,
                                    use_sum_l1=m.USE_SUM_L1_DISTANCE)
    return HungarianMatcher(m.CLASS_COST, m.BBX_L1_COST, m.BBX_GIOU_COST, cfg.MODEL.LOSS.FOCAL_ALPHA)
