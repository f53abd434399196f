"""Training losses of the image and video models: focal classification, L1, GIoU_eps, mask focal and dice.

:class:`SetCriterion` matches (or reuses the model's matching), builds the per-layer loss dict with the
official key names and leaves the weighting to ``weight_dict`` (:func:`build_weight_dict`, spec §6.4).
The same class serves DeVIS clips: targets then carry ``valid`` flags and every (instance, frame) entry,
so a matched pair on an absent frame still regresses its filler box and empty mask but counts as
background for the class loss.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou

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
    n = torch.as_tensor([float(count)], dtype=torch.float64, device=device)
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
        world = torch.distributed.get_world_size()
    return max(n.item() / world, 1.0)


def _pad_masks(masks: Sequence[Tensor]) -> Tensor:
    """Stack (N_b, H_b, W_b) masks of a batch into (B, max N, max H, max W), zero-padded, same dtype."""
    n = max(m.shape[0] for m in masks)
    h = max(m.shape[1] for m in masks)
    w = max(m.shape[2] for m in masks)
    out = torch.zeros((len(masks), n, h, w), dtype=masks[0].dtype, device=masks[0].device)
    for b, m in enumerate(masks):
        out[b, : m.shape[0], : m.shape[1], : m.shape[2]] = m
    return out


class SetCriterion(nn.Module):
    """Set-prediction losses for all decoder layers; returns the UNWEIGHTED losses.

    Keys: loss_ce, class_error (logging, final layer only), loss_bbox, loss_giou, loss_mask,
    loss_dice for the final layer; aux layers i add ``_{i}`` (mask terms only where the aux dict
    carries ``pred_masks``). Weighted total: Σ weight_dict[k]·losses[k] (:meth:`total_loss`).
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
    @staticmethod
    def _matched_valid(targets: Sequence[dict], indices) -> list[Tensor]:
        """Per batch element, (n_matched,) bool: is the matched target entry present on its frame."""
        out = []
        for b, (t, (_, tgt_idx)) in enumerate(zip(targets, indices)):
            n = len(t["labels"])
            if tgt_idx.numel() and int(tgt_idx.max()) >= n:
                raise IndexError(f"SetCriterion: matched target index {int(tgt_idx.max())} in batch element "
                                 f"{b}, which has only {n} target entries")
            valid = t.get("valid")
            if valid is None:
                out.append(torch.ones(tgt_idx.numel(), dtype=torch.bool, device=tgt_idx.device))
            else:
                out.append(valid.to(tgt_idx.device)[tgt_idx].bool())
        return out

    @staticmethod
    def _regressed(valid: list[Tensor]) -> list[Tensor]:
        # Boxes and masks are regressed on every matched frame, absent ones included (filler box,
        # empty mask); only when a clip has no present matched entry at all does the official code
        # keep the present ones, i.e. none.
        return [torch.ones_like(v) if bool(v.any()) else v for v in valid]

    # -- individual losses -------------------------------------------------------------------------
    def loss_labels(self, outputs: dict, targets, indices, num_boxes: float, valid, log: bool = True) -> dict:
        """Focal classification over all B·Q·K logits; matched present entries are the positives.

        outputs['pred_logits']: (B, Q, K). Returns loss_ce (and class_error in percent if ``log``).
        """
        logits = outputs["pred_logits"]
        onehot = torch.zeros_like(logits)
        pos_logits, pos_labels = [], []
        num_logits = logits.shape[-1]
        for b, (t, (src, tgt), v) in enumerate(zip(targets, indices, valid)):
            src, labels = src[v.to(src.device)], t["labels"][tgt[v.to(tgt.device)]]
            if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < num_logits):
                raise ValueError(f"SetCriterion: batch element {b} has target labels {labels.tolist()}; "
                                 f"expected 0-based classes in 0..{num_logits - 1}")
            onehot[b, src.to(logits.device), labels.to(logits.device)] = 1
            pos_logits.append(logits[b, src.to(logits.device)])
            pos_labels.append(labels.to(logits.device))
        loss = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma).sum() / num_boxes
        out = {"loss_ce": loss}
        if log:
            pos_logits_t, pos_labels_t = torch.cat(pos_logits), torch.cat(pos_labels)
            if pos_labels_t.numel() == 0:
                out["class_error"] = torch.tensor(100.0, dtype=logits.dtype, device=logits.device)
            else:
                correct = (pos_logits_t.argmax(-1) == pos_labels_t).to(logits.dtype).mean()
                out["class_error"] = (100 - 100 * correct).detach()
        return out

    def loss_boxes(self, outputs: dict, targets, indices, num_boxes: float, valid) -> dict:
        """L1 and (1 − GIoU_eps) over the regressed matched pairs, each summed / num_boxes.

        outputs['pred_boxes']: (B, Q, 4) normalised cx, cy, w, h.
        """
        keep = self._regressed(valid)
        src = torch.cat([outputs["pred_boxes"][b, s[k.to(s.device)].to(outputs["pred_boxes"].device)]
                         for b, ((s, _), k) in enumerate(zip(indices, keep))])
        tgt = torch.cat([t["boxes"][j[k.to(j.device)]] for t, (_, j), k in zip(targets, indices, keep)])
        tgt = tgt.to(src)
        loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        giou = generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
        return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    def loss_masks(self, outputs: dict, targets, indices, num_boxes: float, valid) -> dict:
        """Pixel focal and dice losses of the matched masks at the padded batch resolution.

        outputs['pred_masks']: (M, h, w) or (M, 1, h, w) logits of the M matched pairs in the
        concatenated order of ``indices``; targets' masks: (N_b, H_b, W_b), zero-padded here to the
        batch max (H, W); the logits are bilinearly upsampled (align_corners=False) to it.
        """
        pred = outputs["pred_masks"]
        if pred.dim() == 4:
            pred = pred[:, 0]
        n_matched = sum(int(s.numel()) for s, _ in indices)
        if pred.shape[0] != n_matched:
            raise ValueError(f"SetCriterion: pred_masks has {pred.shape[0]} masks but the matching has "
                             f"{n_matched} pairs; expected one mask per matched pair")
        keep = torch.cat(self._regressed(valid)).to(pred.device)
        padded = _pad_masks([t["masks"] for t in targets])
        tgt = torch.cat([padded[b, j.to(padded.device)] for b, (_, j) in enumerate(indices)])
        tgt = tgt.to(pred.device)[keep].to(pred.dtype)
        pred = F.interpolate(pred[keep][:, None], size=padded.shape[-2:], mode="bilinear",
                             align_corners=False)[:, 0]
        pred, tgt = pred.flatten(1), tgt.flatten(1)
        return {"loss_mask": mask_focal_loss(pred, tgt, num_boxes, self.focal_alpha, self.focal_gamma),
                "loss_dice": dice_loss(pred, tgt, num_boxes)}

    # -- driver ------------------------------------------------------------------------------------
    def _layer_losses(self, outputs: dict, targets, indices, num_boxes: float, log: bool) -> dict:
        valid = self._matched_valid(targets, indices)
        losses = {}
        if "labels" in self.losses:
            losses.update(self.loss_labels(outputs, targets, indices, num_boxes, valid, log=log))
        if "boxes" in self.losses:
            losses.update(self.loss_boxes(outputs, targets, indices, num_boxes, valid))
        if "masks" in self.losses and "pred_masks" in outputs:
            losses.update(self.loss_masks(outputs, targets, indices, num_boxes, valid))
        return losses

    def forward(self, outputs: dict, targets: Sequence[dict]) -> dict[str, Tensor]:
        """Compute the unweighted losses of the final and auxiliary decoder layers.

        outputs: pred_logits (B, Q, K), pred_boxes (B, Q, 4), optional indices (list of B
        (pred_idx, tgt_idx)), optional pred_masks (M, h, w), optional aux_outputs (list over layers
        0..D−2 of dicts with the same keys). targets: B dicts with labels (N_b,), boxes (N_b, 4),
        optional masks (N_b, H_b, W_b) bool and valid (N_b,) flags.
        Returns {loss name: scalar tensor}.
        """
        if "masks" in self.losses and "pred_masks" not in outputs:
            raise KeyError("SetCriterion: the 'masks' loss is on but outputs have no 'pred_masks'")
        final = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        indices = outputs.get("indices")
        if indices is None:
            indices = self.matcher(final, targets)
        num_boxes = _distributed_num_boxes(sum(len(t["labels"]) for t in targets),
                                           outputs["pred_logits"].device)
        losses = self._layer_losses(final, targets, indices, num_boxes, log=True)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_indices = aux.get("indices")
            if aux_indices is None:
                aux_indices = self.matcher(aux, targets)
            layer = self._layer_losses(aux, targets, aux_indices, num_boxes, log=False)
            losses.update({f"{k}_{i}": v for k, v in layer.items()})
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
