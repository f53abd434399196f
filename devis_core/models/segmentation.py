"""Deformable Mask Head model: Deformable DETR plus per-instance masks from attention maps and an FPN head."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from devis_core.matcher import match_layers

from .deformable_detr import DeformableDETR, build_deformable_detr
from .mask_head import MaskHeadConv, MultiScaleMHAttentionMap
from .postprocess import topk_detections

# Transformer level of each stride (/8 is level 0) and backbone stage of each stride (/4 is stage 0).
ENCODED_LEVEL = {"/8": 0, "/16": 1, "/32": 2, "/64": 3}
BACKBONE_STAGE = {"/4": 0, "/8": 1, "/16": 2, "/32": 3}
BACKBONE_CHANNELS = {"/4": 256, "/8": 512, "/16": 1024, "/32": 2048}


def _check_features(used_features: Sequence[Sequence[str]], att_maps_res: Sequence[str]) -> None:
    for res, kind in used_features:
        ok = ((kind == "backbone" and res in BACKBONE_STAGE)
              or (kind in ("encoded", "compressed_backbone") and res in ENCODED_LEVEL))
        if not ok:
            raise ValueError(f"MODEL.MASK_HEAD.USED_FEATURES: ({res!r}, {kind!r}) is not available; 'backbone' "
                             f"takes {sorted(BACKBONE_STAGE)}, 'encoded'/'compressed_backbone' take "
                             f"{sorted(ENCODED_LEVEL)}")
    for res in att_maps_res:
        if res not in ENCODED_LEVEL:
            raise ValueError(f"MODEL.MASK_HEAD.UPSAMPLING_RESOLUTIONS: {res!r} is not one of {sorted(ENCODED_LEVEL)}")
    if used_features[0][0] != att_maps_res[0]:
        raise ValueError(f"MODEL.MASK_HEAD: USED_FEATURES starts at {used_features[0][0]} but "
                         f"UPSAMPLING_RESOLUTIONS starts at {att_maps_res[0]}; they must start at the same scale")


class DeformableDETRSegm(nn.Module):
    """Deformable DETR (``def_detr``) + ``bbox_attention`` + ``mask_head`` (official state names).

    Training (official behaviour): the matcher runs inside forward for the last layer and for every
    layer in ``mask_aux_loss``; masks are computed only for the matched embeddings.
    """

    def __init__(self, def_detr: DeformableDETR, matcher, used_features: Sequence[Sequence[str]] = (
            ("/32", "encoded"), ("/16", "encoded"), ("/8", "encoded"), ("/4", "backbone")),
                 att_maps_res: Sequence[str] = ("/32", "/16", "/8"), use_mdc: bool = True,
                 mask_aux_loss: Sequence[int] = (2,), num_out: int = 100):
        super().__init__()
        _check_features(used_features, att_maps_res)
        num_dec = len(def_detr.transformer.decoder.layers)
        for lvl in mask_aux_loss:
            if not 0 <= lvl < num_dec - 1:
                raise ValueError(f"MODEL.LOSS.MASK_AUX_LOSS: layer {lvl} is not an auxiliary decoder layer "
                                 f"(0..{num_dec - 2} for {num_dec} decoder layers)")
        if mask_aux_loss and not def_detr.aux_loss:
            raise ValueError("MODEL.LOSS.MASK_AUX_LOSS is set but MODEL.LOSS.AUX_LOSS is False")
        self.def_detr = def_detr
        self.matcher = matcher
        self.used_features = [tuple(f) for f in used_features]
        self.att_maps_res = list(att_maps_res)
        self.mask_aux_loss = list(mask_aux_loss)
        self.num_out = num_out
        c, m = def_detr.transformer.d_model, def_detr.transformer.n_heads
        fpn_dims = tuple(BACKBONE_CHANNELS[res] if kind == "backbone" else c for res, kind in self.used_features[1:])
        self.bbox_attention = MultiScaleMHAttentionMap(c, c, m, num_levels=len(self.att_maps_res))
        self.mask_head = MaskHeadConv(c, fpn_dims, m, use_mdc, num_att_maps=len(self.att_maps_res))

    def _head_features(self, feats: dict) -> list[Tensor]:
        out = []
        for res, kind in self.used_features:
            if kind == "backbone":
                out.append(feats["features"][BACKBONE_STAGE[res]].tensors)
            else:
                maps = feats["memories"] if kind == "encoded" else feats["srcs"]
                out.append(maps[0] if len(maps) == 1 else maps[ENCODED_LEVEL[res]])
        return out

    def mask_logits(self, feats: dict, embeddings: Tensor, batch_index: Tensor) -> Tensor:
        """Mask logits for a set of query embeddings.

        feats: ``DeformableDETR.forward_features`` output; embeddings: (N, C) decoder outputs;
        batch_index: (N,) int64 image of each embedding. Returns (N, ceil(H/4), ceil(W/4)) logits at the
        stride of the finest used feature (4 for the default features) of the padded batch.
        """
        if len(feats["memories"]) == 1:
            keys, masks = [feats["memories"][0]], [feats["masks"][0]]
        else:
            keys = [feats["memories"][ENCODED_LEVEL[r]] for r in self.att_maps_res]
            masks = [feats["masks"][ENCODED_LEVEL[r]] for r in self.att_maps_res]
        att = self.bbox_attention(embeddings, keys, batch_index, masks)
        return self.mask_head(self._head_features(feats), att, batch_index)[:, 0]

    def _match(self, out: dict, targets: list[dict]) -> None:
        """Store ``indices`` in the final dict and in every aux dict of ``out``: all decoder layers are
        matched in one batched matcher call (one device-to-host transfer of the costs)."""
        layers = list(out.get("aux_outputs", [])) + [out]
        heads = [{"pred_logits": o["pred_logits"], "pred_boxes": o["pred_boxes"]} for o in layers]
        for o, indices in zip(layers, match_layers(self.matcher, heads, targets)):
            o["indices"] = indices

    def _matched_masks(self, out_layer: dict, feats: dict, layer: int) -> None:
        """Mask logits of the matched queries of one layer (``out_layer['indices']``) as ``pred_masks``."""
        indices = out_layer["indices"]
        hs = feats["hs"][layer]
        device = hs.device
        batch_index = torch.cat([torch.full((len(src),), b, dtype=torch.long)
                                 for b, (src, _) in enumerate(indices)]).to(device, non_blocking=True)
        query_index = torch.cat([src for src, _ in indices]).to(device, non_blocking=True)
        out_layer["pred_masks"] = self.mask_logits(feats, hs[batch_index, query_index], batch_index)

    def _training_outputs(self, out: dict, feats: dict, targets: list[dict] | None) -> None:
        """With targets: indices for every layer, masks of the matched queries for the last layer and (in
        training) the ``mask_aux_loss`` layers."""
        if self.training and targets is None:
            raise ValueError(f"{type(self).__name__}: training forward needs targets (the matcher picks the "
                             "embeddings that get masks)")
        if targets is None:
            return
        self._match(out, targets)
        self._matched_masks(out, feats, -1)
        if self.training:
            for lvl in self.mask_aux_loss:
                self._matched_masks(out["aux_outputs"][lvl], feats, lvl)

    def forward(self, samples, targets: list[dict] | None = None) -> dict:
        """samples: NestedTensor images (B, 3, H, W) + mask (B, H, W); targets: B dicts (labels (n,) 0-based,
        boxes (n, 4) normalised cxcywh, masks (n, H_i, W_i)), required in training, optional at eval.

        Returns the detector dict (pred_logits (B, Q, K), pred_boxes (B, Q, 4), aux_outputs); with targets,
        ``indices`` (B pairs (pred_idx, tgt_idx)) in the final dict and every aux dict, and ``pred_masks``
        (N_matched, h, w) in the final dict and in each aux layer of ``mask_aux_loss`` (training only); at eval ``topk``: scores, labels,
        query_indexes, boxes (B, k, 4) normalised cxcywh and masks (B, k, h, w) logits.
        """
        feats = self.def_detr.forward_features(samples)
        out = self.def_detr.predict(feats)
        self._training_outputs(out, feats, targets)
        if not self.training:
            top = topk_detections(out["pred_logits"], out["pred_boxes"], self.num_out)
            b, k = top["query_indexes"].shape
            batch_index = torch.arange(b, device=out["pred_logits"].device).repeat_interleave(k)
            emb = feats["hs"][-1][batch_index, top["query_indexes"].reshape(-1)]
            logits = self.mask_logits(feats, emb, batch_index)
            top["masks"] = logits.view(b, k, *logits.shape[-2:])
            out["topk"] = top
        return out


def build_segmentation_model(cfg, num_classes: int, matcher) -> DeformableDETRSegm:
    """Deformable Mask Head from MODEL.MASK_HEAD.*, MODEL.LOSS.MASK_AUX_LOSS and TEST.NUM_OUT."""
    mh = cfg.MODEL.MASK_HEAD
    return DeformableDETRSegm(build_deformable_detr(cfg, num_classes), matcher, mh.USED_FEATURES,
                              mh.UPSAMPLING_RESOLUTIONS, mh.USE_MDC,
                              cfg.MODEL.LOSS.MASK_AUX_LOSS if cfg.MODEL.LOSS.AUX_LOSS else [], cfg.TEST.NUM_OUT)
