"""Image post-processing: top-k (query, class) selection, boxes in pixels, masks at the original size."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from devis_core.box_ops import box_cxcywh_to_xyxy


@torch.no_grad()
def topk_detections(logits: Tensor, boxes: Tensor, k: int) -> dict[str, Tensor]:
    """Best ``k`` (query, class) pairs of each image over the flattened Q*K sigmoid scores.

    logits: (B, Q, K) class logits; boxes: (B, Q, 4) normalised cx, cy, w, h.
    Returns dict scores (B, k) descending, labels (B, k) 0-based class, query_indexes (B, k) int64
    (a query may appear once per class), boxes (B, k, 4) normalised cx, cy, w, h of those queries.
    """
    b, q, n_cls = logits.shape
    if k > q * n_cls:
        raise ValueError(f"topk_detections: TEST.NUM_OUT={k} exceeds the {q}x{n_cls} (query, class) pairs")
    scores, flat = torch.topk(logits.sigmoid().reshape(b, -1), k, dim=1)
    query = torch.div(flat, n_cls, rounding_mode="floor")
    return {"scores": scores, "labels": flat % n_cls, "query_indexes": query,
            "boxes": torch.gather(boxes, 1, query[..., None].expand(-1, -1, 4))}


class PostProcess(nn.Module):
    """Top-``num_out`` detections per image with xyxy boxes scaled to ``target_sizes`` (no clamping)."""

    def __init__(self, num_out: int = 100):
        super().__init__()
        self.num_out = num_out

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """outputs: pred_logits (B, Q, K), pred_boxes (B, Q, 4) and optionally a precomputed ``topk`` dict;
        target_sizes: (B, 2) (h, w) per image. Returns B dicts scores (k,), labels (k,) 0-based,
        boxes (k, 4) xyxy pixels, query_indexes (k,)."""
        if target_sizes.shape != (outputs["pred_logits"].shape[0], 2):
            raise ValueError(f"PostProcess: target_sizes must be (B, 2) (h, w), got {tuple(target_sizes.shape)}")
        top = outputs.get("topk") or topk_detections(outputs["pred_logits"], outputs["pred_boxes"], self.num_out)
        h, w = target_sizes.unbind(1)
        scale = torch.stack([w, h, w, h], 1).to(top["boxes"].dtype)
        boxes = box_cxcywh_to_xyxy(top["boxes"]) * scale[:, None, :]
        return [{"scores": s, "labels": lab, "boxes": bx, "query_indexes": qi}
                for s, lab, bx, qi in zip(top["scores"], top["labels"], boxes, top["query_indexes"])]


class PostProcessSegm(nn.Module):
    """Binary masks at the original image size from the /4 mask logits of the top-k detections."""

    def __init__(self, threshold: float = 0.5):
        super().__init__()
        self.threshold = threshold

    @torch.no_grad()
    def forward(self, results: list[dict], outputs: dict, orig_target_sizes: Tensor,
                max_target_sizes: Tensor) -> list[dict]:
        """results: PostProcess output (modified in place and returned); outputs['topk']['masks']:
        (B, k, h, w) logits at stride 4 of the padded batch; orig_target_sizes: (B, 2) original (h, w);
        max_target_sizes: (B, 2) resized (h, w) of each image inside the padded batch.
        Adds ``masks`` (k, 1, H_orig, W_orig) bool: bilinear upsampling to the padded size, sigmoid >
        threshold, crop to the image, nearest resize to the original size."""
        if len(orig_target_sizes) != len(max_target_sizes):
            raise ValueError("PostProcessSegm: orig_target_sizes and max_target_sizes differ in length")
        max_h, max_w = max_target_sizes.max(0)[0].tolist()
        masks = F.interpolate(outputs["topk"]["masks"], size=(max_h, max_w), mode="bilinear", align_corners=False)
        masks = masks.sigmoid() > self.threshold
        for i, (m, size, orig) in enumerate(zip(masks, max_target_sizes, orig_target_sizes)):
            h, w = size.tolist()
            crop = m[:, :h, :w].unsqueeze(1).float()
            results[i]["masks"] = F.interpolate(crop, size=tuple(orig.tolist()), mode="nearest").to(torch.bool)
        return results


def build_postprocessors(cfg) -> dict[str, nn.Module]:
    """{'bbox': PostProcess(TEST.NUM_OUT)} plus {'segm': PostProcessSegm()} when MODEL.MASK_ON."""
    post = {"bbox": PostProcess(cfg.TEST.NUM_OUT)}
    if cfg.MODEL.MASK_ON:
        post["segm"] = PostProcessSegm()
    return post


@torch.no_grad()
def clip_topk(logits: Tensor, boxes: Tensor, num_frames: int, k: int, tgt_size, clip_length: int) -> dict:
    """DeVIS per-clip selection (spec §7.3): top-``k`` (slot, class) pairs of the frame-averaged scores.

    logits: (T*N_q, K) class logits, frame-major; boxes: (T*N_q, 4) normalised cx, cy, w, h;
    tgt_size: (H0, W0) original video size; clip_length: the first frames that are real (scores are
    averaged over them, outputs cover them).
    Returns scores (T', k) per-frame probability of each pair, labels (T', k) category ids (class + 1),
    boxes (T', k, 4) xyxy pixels clamped to the image, center_points (T', k, 2) normalised (cx, cy),
    top_k_idxs (k,) slot of each pair, inverse_idxs (k,) index of the slot among the sorted unique slots.
    """
    q, n_cls = logits.shape
    if q % num_frames:
        raise ValueError(f"clip_topk: {q} queries is not a multiple of num_frames={num_frames}")
    if not 1 <= clip_length <= num_frames:
        raise ValueError(f"clip_topk: clip_length must be in 1..{num_frames}, got {clip_length}")
    n_q = q // num_frames
    if k > n_q * n_cls:
        raise ValueError(f"clip_topk: TEST.NUM_OUT={k} exceeds the {n_q}x{n_cls} (slot, class) pairs")
    prob = logits.sigmoid().view(num_frames, n_q, n_cls)[:clip_length]
    boxes = boxes.view(num_frames, n_q, 4)[:clip_length]
    _, flat = torch.topk(prob.mean(0).flatten(), k)
    slots = torch.div(flat, n_cls, rounding_mode="floor")
    classes = flat % n_cls
    h0, w0 = (float(v) for v in tgt_size)
    sel = boxes[:, slots]                                                     # (T', k, 4)
    xyxy = box_cxcywh_to_xyxy(sel) * sel.new_tensor([w0, h0, w0, h0])
    xyxy = torch.stack([xyxy[..., 0].clamp(0, w0), xyxy[..., 1].clamp(0, h0),
                        xyxy[..., 2].clamp(0, w0), xyxy[..., 3].clamp(0, h0)], -1)
    _, inverse = torch.unique(slots, sorted=True, return_inverse=True)
    return {"scores": prob[:, slots, classes], "labels": (classes + 1)[None].expand(clip_length, k).clone(),
            "boxes": xyxy, "center_points": sel[..., :2].clone(), "top_k_idxs": slots, "inverse_idxs": inverse}
