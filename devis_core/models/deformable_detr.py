"""Deformable DETR: backbone, input projections (incl. the extra /64 level), transformer, per-layer heads."""
from __future__ import annotations

import copy
import math

from torch import nn

from .backbone import Joiner, build_backbone, downsample_mask
from .heads import MLP, refine_boxes
from .nested import as_nested_tensor
from .transformer import DeformableTransformer, build_transformer


class DeformableDETR(nn.Module):
    """Detector with per-decoder-layer class/box heads; state names match the official checkpoints
    (``backbone.0.body.*``, ``transformer.*``, ``class_embed.{i}``, ``bbox_embed.{i}`` aliased as
    ``transformer.decoder.bbox_embed.{i}``, ``query_embed``, ``input_proj.{l}``)."""

    def __init__(self, backbone: Joiner, transformer: DeformableTransformer, num_classes: int, num_queries: int,
                 num_feature_levels: int = 4, aux_loss: bool = True, with_box_refine: bool = True):
        super().__init__()
        if num_feature_levels not in (1, 3, 4):
            raise ValueError(f"DeformableDETR: num_feature_levels must be 1, 3 or 4, got {num_feature_levels}")
        self.backbone = backbone
        self.transformer = transformer
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        c = transformer.d_model
        self.query_embed = nn.Embedding(num_queries, 2 * c)
        if num_feature_levels == 1:
            # Ablation setting: only the /32 map.
            in_channels = [backbone.num_channels[3]]
            self.input_proj = nn.ModuleList([self._proj(in_channels[0], c, 1)])
        else:
            in_channels = backbone.num_channels[1:]
            projs = [self._proj(ch, c, 1) for ch in in_channels]
            if num_feature_levels == 4:
                # The /64 level is a strided 3x3 conv on the raw C5 map, not on its projection.
                projs.append(self._proj(in_channels[-1], c, 3, stride=2))
            self.input_proj = nn.ModuleList(projs)

        class_embed = nn.Linear(c, num_classes)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))  # prior probability 0.01
        bbox_embed = MLP(c, c, 4, 3)
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        num_pred = len(transformer.decoder.layers)
        if with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            # Registered twice on purpose: official checkpoints hold both key sets for the same tensors.
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([class_embed] * num_pred)
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)

    @staticmethod
    def _proj(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Sequential:
        conv = nn.Conv2d(in_ch, out_ch, kernel_size=kernel, stride=stride, padding=kernel // 2)
        nn.init.xavier_uniform_(conv.weight, gain=1)
        nn.init.zeros_(conv.bias)
        return nn.Sequential(conv, nn.GroupNorm(32, out_ch))

    def forward_features(self, samples) -> dict:
        """Run backbone, projections and transformer.

        samples: NestedTensor (images (B, 3, H, W), mask (B, H, W)) or anything ``as_nested_tensor`` takes.
        Returns the transformer dict (see ``DeformableTransformer.forward``) plus ``features``: the 4
        backbone stages as NestedTensors (strides 4..32), ``srcs``: the projected levels
        (B, C, H_l, W_l), ``masks``: their padding masks (B, H_l, W_l).
        """
        samples = as_nested_tensor(samples)
        features, pos = self.backbone(samples)
        if self.num_feature_levels == 1:
            used, used_pos = [features[-1]], [pos[-1]]
        else:
            used, used_pos = features[1:], pos[1:]
        srcs = [proj(f.tensors) for proj, f in zip(self.input_proj, used)]
        masks = [f.mask for f in used]
        pos_list = list(used_pos)
        for lvl in range(len(srcs), self.num_feature_levels):
            src = self.input_proj[lvl](used[-1].tensors)
            mask = downsample_mask(samples.mask, src.shape[-2:])
            srcs.append(src)
            masks.append(mask)
            pos_list.append(self.backbone[1](mask, dtype=src.dtype))
        out = self.transformer(srcs, masks, pos_list, self.query_embed.weight)
        out.update(features=features, srcs=srcs, masks=masks)
        return out

    def predict(self, feats: dict) -> dict:
        """Per-decoder-layer heads.

        feats: output of ``forward_features``. Returns dict pred_logits (B, Q, K), pred_boxes (B, Q, 4)
        normalised cx, cy, w, h of the last layer, and aux_outputs: list over layers 0..D-2 of
        {pred_logits, pred_boxes} (when aux_loss).
        """
        hs, refs = feats["hs"], feats["inter_references"]
        logits, boxes = [], []
        for lvl in range(hs.shape[0]):
            logits.append(self.class_embed[lvl](hs[lvl]))
            if self.with_box_refine and self.transformer.decoder.bbx_gradient_prop:
                boxes.append(refs[lvl])
            else:
                # Recomputed (same values) so the box head gets a gradient when the references are detached.
                prev = feats["init_reference"] if lvl == 0 else refs[lvl - 1]
                boxes.append(refine_boxes(self.bbox_embed[lvl](hs[lvl]), prev))
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out

    def forward(self, samples, targets: list[dict] | None = None) -> dict:
        """samples: NestedTensor (B, 3, H, W) + (B, H, W) mask; targets are unused by the box-only model.
        Returns the ``predict`` dict."""
        return self.predict(self.forward_features(samples))


def build_deformable_detr(cfg, num_classes: int) -> DeformableDETR:
    """Deformable DETR from the config; ``num_classes`` = number of sigmoid logits (91 for COCO)."""
    if cfg.MODEL.WITH_REF_POINT_REFINE:
        raise ValueError("MODEL.WITH_REF_POINT_REFINE=True is not supported (unused by every official config)")
    if not cfg.MODEL.LOSS.FOCAL_LOSS:
        raise ValueError("MODEL.LOSS.FOCAL_LOSS=False is not supported (the official softmax path is unimplemented)")
    return DeformableDETR(build_backbone(cfg), build_transformer(cfg), num_classes, cfg.MODEL.NUM_QUERIES,
                          cfg.MODEL.NUM_FEATURE_LEVELS, cfg.MODEL.LOSS.AUX_LOSS, cfg.MODEL.WITH_BBX_REFINE)
