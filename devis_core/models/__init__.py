"""Models: Deformable DETR, the Deformable Mask Head and their building blocks (reused by the video model)."""
from __future__ import annotations

from torch import nn

from .deformable_detr import DeformableDETR, build_deformable_detr
from .devis import DeVIS, build_devis
from .nested import NestedTensor, nested_tensor_from_tensor_list
from .postprocess import PostProcess, PostProcessSegm, build_postprocessors, clip_topk, topk_detections
from .segmentation import DeformableDETRSegm, build_segmentation_model

__all__ = ["DeVIS", "DeformableDETR", "DeformableDETRSegm", "build_devis", "clip_topk", "NestedTensor", "PostProcess", "PostProcessSegm",
           "build_model", "build_postprocessors", "nested_tensor_from_tensor_list", "topk_detections"]


def build_model(cfg, num_classes: int, load_weights: bool = True) -> nn.Module:
    """The model the config describes: DATASETS.TYPE 'vis' -> DeVIS (``num_classes`` = number of sigmoid
    logits, e.g. 40 for YT-VIS 2019); 'coco' -> Deformable DETR, or the Deformable Mask Head when MODEL.MASK_ON. ``num_classes`` = number of sigmoid logits (91 for COCO).

    With ``load_weights``, ImageNet backbone weights come from MODEL.BACKBONE_WEIGHTS and the checkpoint
    from MODEL.WEIGHTS (both local files; converted as ``devis_core.checkpoint`` describes).
    """
    if cfg.DATASETS.TYPE not in ("coco", "vis"):
        raise ValueError(f"build_model: DATASETS.TYPE is {cfg.DATASETS.TYPE!r}, expected 'coco' or 'vis'")
    if cfg.DATASETS.TYPE == "vis":
        from devis_core.matcher import build_matcher

        # The mask head is always part of DeVIS (MODEL.MASK_ON is ignored for VIS, as officially).
        model = build_devis(cfg, num_classes, build_matcher(cfg))
    elif cfg.MODEL.MASK_ON:
        from devis_core.matcher import build_matcher

        model: nn.Module = build_segmentation_model(cfg, num_classes, build_matcher(cfg))
    else:
        model = build_deformable_detr(cfg, num_classes)
    if load_weights:
        from devis_core import checkpoint

        checkpoint.load_initial_weights(model, cfg)
    return model
