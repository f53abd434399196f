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
