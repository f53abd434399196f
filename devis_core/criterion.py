"""Training losses of the image and video models: focal classification, L1, GIoU_eps, mask focal and dice.

:class:`SetCriterion` matches (or reuses the model's matching), builds the per-layer loss dict with the
official key names and leaves the weighting to ``weight_dict`` (:func:`build_weight_dict`, spec §6.4).
The same class serves DeVIS clips: targets then carry ``valid`` flags and every (instance, frame) entry,
so a matched pair on an absent frame still regresses its filler box and empty mask but counts as
background for the class loss.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .matcher import match_layers

# Official aux-loss weighting (``AUX_LOSS_WEIGHTING``): decoder layer i of the 6-layer decoder gets
# (i+1)/30 of the base weight and the last layer 15/30, so the six factors sum to 1.
AUX_WEIGHTING_AUX = (1 / 30, 2 / 30, 3 / 30, 4 / 30, 5 / 30)
AUX_WEIGHTING_LAST = 15 / 30
_BOX_KEYS = ("loss_ce", "loss_bbox", "loss_giou")


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise sigmoid focal loss (RetinaNet), no reduction.

    logits: (...) raw scores; targets: (...) same shape, 1 for positives and 0 for negatives.
    Returns (...) alpha_t (1 - p_t)^gamma BCE(logits, targets); alpha < 0 disables alpha_t.
    """
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = bce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def dice_loss(logits: Tensor, targets: Tensor, num_boxes: float) -> Tensor:
    """Dice loss summed over masks and divided by ``num_boxes``.

    logits: (N, P) mask logits flattened over pixels; targets: (N, P) binary float masks.
    Returns a scalar Σ_n [1 − (2 Σ p·t + 1) / (Σ p + Σ t + 1)] / num_boxes.
    """
    prob = logits.sigmoid().flatten(1)
    numerator = 2 * (prob * targets).sum(1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_boxes


def mask_focal_loss(logits: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25,
                    gamma: float = 2.0) -> Tensor:
    """Pixel focal loss: mean over pixels, summed over masks, divided by ``num_boxes``.

    logits: (N, P) mask logits; targets: (N, P) binary float masks. Returns a scalar.
    """
    return sigmoid_focal_loss(logits, targets, alpha, gamma).mean(1).sum() / num_boxes


def build_weight_dict(class_coef: float, bbox_coef: float, giou_coef: float, num_decoder_layers: int,
                      aux_loss: bool = True, aux_loss_weighting: bool = False, mask_on: bool = False,
                      mask_coef: float = 1.0, dice_coef: float = 1.0,
                      mask_aux_layers: Iterable[int] = ()) -> dict[str, float]:
    """Loss weights keyed like the criterion's output (spec §6.4), in the official key order.

    Final layer: loss_ce, loss_bbox, loss_giou; aux decoder layers i = 0..D−2: the same keys with
    suffix ``_{i}``; with ``aux_loss_weighting`` the three box/class weights are scaled by 15/30 (last
    layer) and (i+1)/30 (layer i). Mask terms (loss_mask, loss_dice and ``_{i}`` for
    ``mask_aux_layers``) are never re-weighted.
    """
    base = {"loss_ce": class_coef, "loss_bbox": bbox_coef, "loss_giou": giou_coef}
    num_aux = num_decoder_layers - 1
    weights: dict[str, float] = {}
    if aux_loss and aux_loss_weighting:
        if num_aux > len(AUX_WEIGHTING_AUX):
            raise ValueError(f"aux loss weighting is defined for at most {len(AUX_WEIGHTING_AUX) + 1} "
                             f"decoder layers, got MODEL.TRANSFORMER.DECODER_LAYERS={num_decoder_layers}")
        weights.update({k: v * AUX_WEIGHTING_LAST for k, v in base.items()})
        for i in range(num_aux):
            weights.update({f"{k}_{i}": v * AUX_WEIGHTING_AUX[i] for k, v in base.items()})
    else:
        weights.update(base)
        if aux_loss:
            for i in range(num_aux):
                weights.update({f"{k}_{i}": v for k, v in base.items()})
    if mask_on:
        weights["loss_mask"] = mask_coef
        weights["loss_dice"] = dice_coef
        for i in mask_aux_layers:
            if not 0 <= i < num_aux:
                raise ValueError(f"MODEL.LOSS.MASK_AUX_LOSS lists decoder layer {i}; expected an aux "
                                 f"layer index in 0..{num_aux - 1}")
            weights[f"loss_mask_{i}"] = mask_coef
            weights[f"loss_dice_{i}"] = dice_coef
    return weights


def _distributed_num_boxes(count: int, device: torch.device) -> float:
    """Average number of target entries per rank, clamped at 1 (normaliser of every loss)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        # One process: the same value without a round trip through the device.
        return max(float(count), 1.0)
    n = torch.as_tensor([float(count)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(n)
    return max(n.item() / torch.distributed.get_world_size(), 1.0)


def _pad_masks(masks: Sequence[Tensor]) -> Tensor:
    """Stack (N_b, H_b, W_b) masks of a batch into (B, max N, max H, max W), zero-padded, same dtype."""
    if len(masks) == 1:
        return masks[0][None]                # nothing to pad: a view, no copy
    n = max(m.shape[0] for m in masks)
    h = max(m.shape[1] for m in masks)
    w = max(m.shape[2] for m in masks)
    out = torch.zeros((len(masks), n, h, w), dtype=masks[0].dtype, device=masks[0].device)
    for b, m in enumerate(masks):
        out[b, : m.shape[0], : m.shape[1], : m.shape[2]] = m
    return out


def _cat(tensors: Sequence[Tensor]) -> Tensor:
    """torch.cat that returns a single tensor as it is (no copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors))


def _stack(tensors: Sequence[Tensor]) -> Tensor:
    """torch.stack along a new first axis; one tensor becomes a view with that axis (no copy)."""
    return tensors[0][None] if len(tensors) == 1 else torch.stack(list(tensors))


class _Targets(NamedTuple):
    """What every decoder layer's losses read from the targets, prepared once per forward.

    counts: entries N_b per batch element; offsets: their start in the concatenation; labels: host
    (ΣN,) int64; valid: host (ΣN,) bool (present on its frame); boxes: (ΣN, 4) cx, cy, w, h on the
    targets' device; masks: (B, max N, H, W) zero-padded target masks, or None without mask loss.
    """
    counts: list[int]
    offsets: list[int]
    labels: np.ndarray
    valid: np.ndarray
    boxes: Tensor
    masks: Tensor | None


class _Pairs(NamedTuple):
    """The matched pairs of ALL decoder layers, concatenated layer by layer, as device index tensors
    (built on the host).

    pos_layer, pos_batch, pos_query, pos_label: (ΣP,) pairs present on their frame (class-loss positives);
    reg_layer, reg_batch, reg_query: (ΣR,) regressed pairs (box and mask losses); reg_target: their entry
    in the concatenated targets; reg_slot: their position among their layer's regressed pairs; reg_rank:
    their position among their layer's M matched pairs (the order of ``pred_masks``); reg_mask_row: their
    row b·max N + j of the flattened padded masks. num_pos, num_reg, num_matched: per-layer P, R, M (host).
    """
    pos_layer: Tensor
    pos_batch: Tensor
    pos_query: Tensor
    pos_label: Tensor
    reg_layer: Tensor
    reg_batch: Tensor
    reg_query: Tensor
    reg_target: Tensor
    reg_slot: Tensor
    reg_rank: Tensor
    reg_mask_row: Tensor
    num_pos: list[int]
    num_reg: list[int]
    num_matched: list[int]

    def layer_slice(self, field: str, layer: int) -> Tensor:
        """The entries of one layer of a ``reg_*`` or ``pos_*`` field."""
        counts = self.num_reg if field.startswith("reg_") else self.num_pos
        start = sum(counts[:layer])
        return getattr(self, field)[start:start + counts[layer]]


_PAIR_FIELDS = len(_Pairs._fields) - 3


class SetCriterion(nn.Module):
    """Set-prediction losses for all decoder layers; returns the UNWEIGHTED losses.

    Keys: loss_ce, class_error (logging, final layer only), loss_bbox, loss_giou, loss_mask,
    loss_dice for the final layer; aux layers i add ``_{i}`` (mask terms only where the aux dict
    carries ``pred_masks``). Weighted total: Σ weight_dict[k]·losses[k] (:meth:`total_loss`).

    Host work per forward is kept small on purpose (a GPU iteration is bound by it): the targets'
    labels / valid flags / box checks come to the host in one transfer, every layer's index
    bookkeeping is done there in numpy, and all layers' index tensors go to the device in one copy.
    """

    def __init__(self, num_classes: int, matcher, weight_dict: dict[str, float],
                 losses: Sequence[str] = ("labels", "boxes"), focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0):
        super().__init__()
        unknown = set(losses) - {"labels", "boxes", "masks"}
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {sorted(unknown)}; expected labels, boxes, masks")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = tuple(losses)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    # -- index bookkeeping -------------------------------------------------------------------------
    def _prepare_targets(self, targets: Sequence[dict], num_logits: int) -> _Targets:
        """Concatenate the targets and read their labels, valid flags and box sanity in ONE transfer;
        raise for labels outside 0..num_logits-1 or boxes that are not finite with w, h >= 0."""
        counts = [len(t["labels"]) for t in targets]
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64).tolist() if counts else []
        boxes = _cat([t["boxes"] for t in targets])
        labels = _cat([t["labels"] for t in targets]).long()
        good = torch.isfinite(boxes).all(-1) & (boxes[:, 2:] >= 0).all(-1)
        parts = [labels, good.long()]
        has_valid = [t.get("valid") is not None for t in targets]
        if any(has_valid):
            parts.append(_cat([t["valid"].to(labels.device).long() if t.get("valid") is not None
                                    else torch.ones_like(t["labels"], dtype=torch.long, device=labels.device)
                                    for t in targets]))
        host = torch.cat([p.to(labels.device) for p in parts]).cpu().numpy()
        n = labels.numel()
        labels_h, good_h = host[:n], host[n:2 * n].astype(bool)
        valid_h = host[2 * n:].astype(bool) if any(has_valid) else np.ones(n, dtype=bool)
        for b, (off, cnt) in enumerate(zip(offsets, counts)):
            lab = labels_h[off:off + cnt]
            if cnt and not (lab.min() >= 0 and lab.max() < num_logits):
                raise ValueError(f"SetCriterion: batch element {b} has target labels {lab.tolist()}; "
                                 f"expected 0-based classes in 0..{num_logits - 1}")
            if not good_h[off:off + cnt].all():
                j = int(np.flatnonzero(~good_h[off:off + cnt])[0])
                raise ValueError(f"SetCriterion: batch element {b}, target entry {j} has box "
                                 f"{targets[b]['boxes'][j].tolist()}; expected finite cx, cy, w, h with w, h >= 0")
        masks = None
        if "masks" in self.losses and all("masks" in t for t in targets):
            masks = _pad_masks([t["masks"] for t in targets])
        return _Targets(counts, offsets, labels_h, valid_h, boxes, masks)

    @staticmethod
    def _layer_plan(tg: _Targets, indices) -> tuple[dict[str, np.ndarray], int]:
        """Host index arrays of one layer (the ``_Pairs`` fields without ``*_layer``) and its M."""
        n_max = max(tg.counts, default=0)
        fields: dict[str, list[np.ndarray]] = {k: [] for k in _Pairs._fields[:_PAIR_FIELDS] if not k.endswith("_layer")}
        rank0 = 0
        if len(indices) != len(tg.counts):
            raise ValueError(f"SetCriterion: {len(indices)} index pairs for {len(tg.counts)} target dicts")
        for b, (src, tgt) in enumerate(indices):
            src = src.detach().cpu().numpy().astype(np.int64, copy=False)
            tgt = tgt.detach().cpu().numpy().astype(np.int64, copy=False)
            n, off = tg.counts[b], tg.offsets[b]
            if tgt.size and int(tgt.max()) >= n:
                raise IndexError(f"SetCriterion: matched target index {int(tgt.max())} in batch element {b}, "
                                 f"which has only {n} target entries")
            present = tg.valid[off + tgt]
            # Boxes and masks are regressed on every matched frame, absent ones included (filler box,
            # empty mask); only when a clip has no present matched entry at all does the official code
            # keep the present ones, i.e. none.
            keep = np.ones_like(present) if present.any() else present
            fields["pos_batch"].append(np.full(int(present.sum()), b, dtype=np.int64))
            fields["pos_query"].append(src[present])
            fields["pos_label"].append(tg.labels[off + tgt[present]])
            fields["reg_batch"].append(np.full(int(keep.sum()), b, dtype=np.int64))
            fields["reg_query"].append(src[keep])
            fields["reg_target"].append(off + tgt[keep])
            fields["reg_rank"].append(rank0 + np.flatnonzero(keep))
            fields["reg_mask_row"].append(b * n_max + tgt[keep])
            rank0 += len(src)
        flat = {k: np.concatenate(f) if f else np.zeros(0, dtype=np.int64) for k, f in fields.items()}
        flat["reg_slot"] = np.arange(len(flat["reg_batch"]), dtype=np.int64)
        return flat, rank0

    def _pairs(self, tg: _Targets, layer_indices: Sequence, device: torch.device) -> _Pairs:
        """``_Pairs`` of all layers; every index array travels to ``device`` in one copy."""
        plans = [self._layer_plan(tg, indices) for indices in layer_indices]
        num_pos = [len(flat["pos_batch"]) for flat, _ in plans]
        num_reg = [len(flat["reg_batch"]) for flat, _ in plans]
        host = {"pos_layer": np.repeat(np.arange(len(plans), dtype=np.int64), num_pos),
                "reg_layer": np.repeat(np.arange(len(plans), dtype=np.int64), num_reg)}
        for key in plans[0][0]:
            host[key] = np.concatenate([flat[key] for flat, _ in plans])
        names = _Pairs._fields[:_PAIR_FIELDS]
        arrays = [host[k].astype(np.int64, copy=False) for k in names]
        packed = torch.from_numpy(np.concatenate(arrays)).to(device, non_blocking=True)
        return _Pairs(*torch.split(packed, [len(a) for a in arrays]), num_pos, num_reg, [m for _, m in plans])

    # -- individual losses (all decoder layers at once where the layers share shapes) ---------------
    def loss_labels(self, logits: Tensor, pairs: _Pairs, num_boxes: float, log: bool = True) -> dict:
        """Focal classification over all B·Q·K logits of every layer; matched present entries are the positives.

        logits: (L, B, Q, K) the layers' pred_logits, final layer first. Returns loss_ce (L,) and, if
        ``log``, class_error (scalar, percent) of the final layer.
        """
        onehot = torch.zeros_like(logits)
        onehot[pairs.pos_layer, pairs.pos_batch, pairs.pos_query, pairs.pos_label] = 1
        loss = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma).flatten(1).sum(1) / num_boxes
        out = {"loss_ce": loss}
        if log:
            if pairs.num_pos[0] == 0:
                out["class_error"] = logits.new_full((), 100.0)
            else:
                batch, query = pairs.layer_slice("pos_batch", 0), pairs.layer_slice("pos_query", 0)
                pos_logits = logits[0, batch, query].detach()
                correct = (pos_logits.argmax(-1) == pairs.layer_slice("pos_label", 0)).to(logits.dtype).mean()
                out["class_error"] = 100 - 100 * correct
        return out

    def loss_boxes(self, boxes: Tensor, tg: _Targets, pairs: _Pairs, num_boxes: float) -> dict:
        """L1 and (1 − GIoU_eps) over each layer's regressed matched pairs, each summed / num_boxes.

        boxes: (L, B, Q, 4) the layers' pred_boxes (normalised cx, cy, w, h), final layer first.
        Returns loss_bbox (L,) and loss_giou (L,).
        """
        src = boxes[pairs.reg_layer, pairs.reg_batch, pairs.reg_query]
        tgt = tg.boxes[pairs.reg_target.to(tg.boxes.device)].to(src)
        # Targets were checked in _prepare_targets; a non-finite prediction gives a non-finite loss,
        # which the training loop reports.
        giou = generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt), check=False)
        per_pair = torch.stack([(src - tgt).abs().sum(-1), 1 - giou])                    # (2, ΣR)
        # each pair to its (layer, slot) cell, then a sum per layer: no scatter-add, so the sums are
        # deterministic on a GPU too
        table = per_pair.new_zeros(2, boxes.shape[0], max(pairs.num_reg, default=0))
        table[:, pairs.reg_layer, pairs.reg_slot] = per_pair
        loss_bbox, loss_giou = table.sum(-1) / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def loss_masks(self, outputs: dict, tg: _Targets, pairs: _Pairs, layer: int, num_boxes: float) -> dict:
        """Pixel focal and dice losses of one layer's matched masks at the padded batch resolution.

        outputs['pred_masks']: (M, h, w) or (M, 1, h, w) logits of the layer's M matched pairs in the
        concatenated order of its indices; targets' masks: (N_b, H_b, W_b), zero-padded to the batch
        max (H, W); the logits are bilinearly upsampled (align_corners=False) to it.
        """
        pred = outputs["pred_masks"]
        if pred.dim() == 4:
            pred = pred[:, 0]
        if pred.shape[0] != pairs.num_matched[layer]:
            raise ValueError(f"SetCriterion: pred_masks has {pred.shape[0]} masks but the matching has "
                             f"{pairs.num_matched[layer]} pairs; expected one mask per matched pair")
        if tg.masks is None:
            raise KeyError("SetCriterion: the 'masks' loss needs 'masks' in every target dict")
        padded = tg.masks.flatten(0, 1)
        tgt = padded[pairs.layer_slice("reg_mask_row", layer).to(padded.device)].to(pred.device).to(pred.dtype)
        pred = F.interpolate(pred[pairs.layer_slice("reg_rank", layer).to(pred.device)][:, None],
                             size=tg.masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        pred, tgt = pred.flatten(1), tgt.flatten(1)
        return {"loss_mask": mask_focal_loss(pred, tgt, num_boxes, self.focal_alpha, self.focal_gamma),
                "loss_dice": dice_loss(pred, tgt, num_boxes)}

    # -- driver ------------------------------------------------------------------------------------
    def forward(self, outputs: dict, targets: Sequence[dict]) -> dict[str, Tensor]:
        """Compute the unweighted losses of the final and auxiliary decoder layers.

        outputs: pred_logits (B, Q, K), pred_boxes (B, Q, 4), optional indices (list of B
        (pred_idx, tgt_idx)), optional pred_masks (M, h, w), optional aux_outputs (list over layers
        0..D−2 of dicts with the same keys). targets: B dicts with labels (N_b,), boxes (N_b, 4),
        optional masks (N_b, H_b, W_b) bool and valid (N_b,) flags. Layers without ``indices`` are
        matched here, all in one batched matcher call; the class and box losses of all layers are
        computed together (one set of ops for the stacked layers).
        Returns {loss name: scalar tensor}.
        """
        if "masks" in self.losses and "pred_masks" not in outputs:
            raise KeyError("SetCriterion: the 'masks' loss is on but outputs have no 'pred_masks'")
        final = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        layers = [final] + list(outputs.get("aux_outputs", []))
        layer_indices = [layer.get("indices") for layer in layers]
        unmatched = [i for i, idx in enumerate(layer_indices) if idx is None]
        if unmatched:
            found = match_layers(self.matcher, [layers[i] for i in unmatched], targets)
            for i, idx in zip(unmatched, found):
                layer_indices[i] = idx
        device = outputs["pred_logits"].device
        tg = self._prepare_targets(targets, outputs["pred_logits"].shape[-1])
        num_boxes = _distributed_num_boxes(sum(tg.counts), device)
        pairs = self._pairs(tg, layer_indices, device)
        stacked: dict[str, Tensor] = {}
        if "labels" in self.losses:
            stacked.update(self.loss_labels(_stack([layer["pred_logits"] for layer in layers]), pairs, num_boxes))
        if "boxes" in self.losses:
            stacked.update(self.loss_boxes(_stack([layer["pred_boxes"] for layer in layers]), tg, pairs, num_boxes))
        per_layer: list[dict] = [{} for _ in layers]
        for key, value in stacked.items():
            if key == "class_error":
                per_layer[0][key] = value
            else:
                for i, v in enumerate(value.unbind(0)):
                    per_layer[i][key] = v
        for i, layer in enumerate(layers):
            if "masks" in self.losses and "pred_masks" in layer:
                per_layer[i].update(self.loss_masks(layer, tg, pairs, i, num_boxes))
        losses = dict(per_layer[0])
        for i, layer_losses in enumerate(per_layer[1:]):
            losses.update({f"{k}_{i}": v for k, v in layer_losses.items()})
        return losses

    def total_loss(self, losses: dict[str, Tensor]) -> Tensor:
        """Σ weight_dict[k]·losses[k] over the keys present in both (class_error is never weighted)."""
        terms = [self.weight_dict[k] * v for k, v in losses.items() if k in self.weight_dict]
        if not terms:
            raise ValueError("SetCriterion.total_loss: no loss key matches weight_dict")
        return torch.stack([t if torch.is_tensor(t) else torch.tensor(t) for t in terms]).sum()


def build_criterion(cfg, num_classes: int, matcher=None) -> SetCriterion:
    """Criterion with the config's weights: MODEL.LOSS.*, MODEL.MASK_ON (image) / always masks (vis),
    MODEL.TRANSFORMER.DECODER_LAYERS; ``matcher`` defaults to ``build_matcher(cfg)``."""
    from .matcher import build_matcher

    loss = cfg.MODEL.LOSS
    if not loss.FOCAL_LOSS:
        raise ValueError("MODEL.LOSS.FOCAL_LOSS is False; only the focal (sigmoid) classification loss "
                         "exists, as in the official code")
    mask_on = bool(cfg.MODEL.MASK_ON) or cfg.DATASETS.TYPE == "vis"
    weights = build_weight_dict(loss.CLASS_COEF, loss.BBX_L1_COEF, loss.BBX_GIOU_COEF,
                                cfg.MODEL.TRANSFORMER.DECODER_LAYERS, loss.AUX_LOSS,
                                loss.AUX_LOSS_WEIGHTING, mask_on, loss.SEGM_MASK_COEF,
                                loss.SEGM_DICE_COEF, loss.MASK_AUX_LOSS if loss.AUX_LOSS else ())
    losses = ("labels", "boxes", "masks") if mask_on else ("labels", "boxes")
    return SetCriterion(num_classes, matcher if matcher is not None else build_matcher(cfg), weights,
                        losses, loss.FOCAL_ALPHA)
