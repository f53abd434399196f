"""DeVIS video model: the Deformable Mask Head's blocks run on a clip with temporal attention (spec §1.9, §4, §5.4).

Composition, not copies: ``def_detr`` is a ``DeformableDETR`` whose transformer was built with
``num_frames`` = T (temporal encoder/decoder attention, joint self-attention over the T*N_q queries)
and whose position encoding carries the learned ``temporal_embed``; ``bbox_attention`` and ``mask_head``
are the image mask head, applied per (trajectory, frame). State names equal the official DeVIS ones.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .deformable_detr import build_deformable_detr
from .postprocess import clip_topk
from .segmentation import DeformableDETRSegm


class DeVIS(DeformableDETRSegm):
    """DeVIS for one clip of T frames (the batch axis of ``samples`` is the frame axis).

    Queries are frame-major: index t*N_q + i is trajectory slot i on frame t. In training the clip
    matcher runs inside forward (last layer and ``mask_aux_loss`` layers) and masks are predicted for the
    matched (slot, frame) pairs only; at eval ``forward`` returns the per-layer predictions and
    ``inference`` the per-clip result of spec §7.3.
    """

    @property
    def num_frames(self) -> int:
        return self.def_detr.transformer.num_frames

    @property
    def num_slots(self) -> int:
        """N_q, the trajectory slots per frame."""
        return self.def_detr.num_queries // self.num_frames

    def trajectory_masks(self, feats: dict, slots: Tensor, layer: int = -1) -> Tensor:
        """Mask logits of whole trajectories: frame t's embedding of slot i against frame t's maps.

        feats: ``DeformableDETR.forward_features`` of the clip; slots: (K,) int64 slot indices;
        layer: decoder layer whose embeddings are used. Returns (K, T, ceil(H/4), ceil(W/4)).
        """
        t_len, n_q = self.num_frames, self.num_slots
        frames = torch.arange(t_len, device=slots.device)
        query = (frames[None] * n_q + slots[:, None]).reshape(-1)      # trajectory-major, frame-minor
        frame_index = frames.repeat(len(slots))
        logits = self.mask_logits(feats, feats["hs"][layer][0, query], frame_index)
        return logits.view(len(slots), t_len, *logits.shape[-2:])

    def _matched_masks(self, out_layer: dict, feats: dict, layer: int) -> None:
        """Mask logits of the matched (slot, frame) pairs of one layer as ``pred_masks`` (M, h, w)."""
        indices = out_layer["indices"]
        if len(indices) != 1:
            raise ValueError(f"DeVIS: a forward takes one clip, got {len(indices)} target dicts")
        hs = feats["hs"][layer][0]
        query = indices[0][0]
        # The frame of prediction t*N_q + i is t: its embedding reads that frame's maps only (computed on
        # the host copy of the indices, then moved with them).
        both = torch.stack([query, torch.div(query, self.num_slots, rounding_mode="floor")]).to(hs.device,
                                                                                                non_blocking=True)
        out_layer["pred_masks"] = self.mask_logits(feats, hs[both[0]], both[1])

    def forward(self, samples, targets: list[dict] | None = None) -> dict:
        """samples: NestedTensor of the clip, frames (T, 3, H, W) + mask (T, H, W); targets: one dict
        (instance-major labels (N*T,), boxes (N*T, 4), valid (N*T,), masks (N*T, H, W)), required in
        training.

        Returns pred_logits (1, T*N_q, K), pred_boxes (1, T*N_q, 4), aux_outputs; with targets
        ``indices`` in the final dict and every aux dict (all layers matched in one call), and
        ``pred_masks`` (matched pairs, (M, h, w)) in the final dict and in each aux layer of
        ``mask_aux_loss`` (training only).
        """
        if targets is not None and len(targets) != 1:
            raise ValueError(f"DeVIS: a forward takes one clip, got {len(targets)} target dicts")
        feats = self.def_detr.forward_features(samples)
        out = self.def_detr.predict(feats)
        self._training_outputs(out, feats, targets)
        return out

    @torch.no_grad()
    def inference(self, samples, tgt_size, clip_length: int | None = None) -> dict[str, Tensor]:
        """Per-clip result (spec §7.3) for a clip whose first ``clip_length`` frames are real.

        tgt_size: (H0, W0) original video size. Returns scores (T', K'), labels (T', K') category ids,
        boxes (T', K', 4) xyxy pixels clamped to the image, center_points (T', K', 2), top_k_idxs (K',)
        slot of each pair, inverse_idxs (K',) index of that slot among the unique slots, masks
        (T', U, ceil(H/4), ceil(W/4)) logits, T' = clip_length, K' = ``num_out``.
        """
        clip_length = self.num_frames if clip_length is None else int(clip_length)
        feats = self.def_detr.forward_features(samples)
        out = self.def_detr.predict(feats)
        res = clip_topk(out["pred_logits"][0], out["pred_boxes"][0], self.num_frames, self.num_out, tgt_size,
                        clip_length)
        unique = torch.unique(res["top_k_idxs"])
        masks = self.trajectory_masks(feats, unique)                       # (U, T, h, w)
        res["masks"] = masks[:, :clip_length].transpose(0, 1)
        return res


def build_devis(cfg, num_classes: int, matcher) -> DeVIS:
    """DeVIS from the config (DATASETS.TYPE 'vis'): MODEL.DEVIS.*, MODEL.MASK_HEAD.*, TEST.NUM_OUT."""
    if cfg.MODEL.MASK_HEAD.DEVIS.CONV_HEAD_3D:
        raise ValueError("MODEL.MASK_HEAD.DEVIS.CONV_HEAD_3D=True (the 3-D conv head ablation) is not "
                         "implemented; set it to False")
    if cfg.MODEL.NUM_QUERIES % cfg.MODEL.DEVIS.NUM_FRAMES:
        raise ValueError(f"MODEL.NUM_QUERIES ({cfg.MODEL.NUM_QUERIES}) must be a multiple of "
                         f"MODEL.DEVIS.NUM_FRAMES ({cfg.MODEL.DEVIS.NUM_FRAMES}): T*N_q frame-major queries")
    mh = cfg.MODEL.MASK_HEAD
    return DeVIS(build_deformable_detr(cfg, num_classes), matcher, mh.USED_FEATURES, mh.UPSAMPLING_RESOLUTIONS,
                 mh.USE_MDC, cfg.MODEL.LOSS.MASK_AUX_LOSS if cfg.MODEL.LOSS.AUX_LOSS else [], cfg.TEST.NUM_OUT)
