"""Models: Deformable DETR, the Deformable Mask Head and their building blocks (reused by the video model)."""
from __future__ import annotations

from torch import nn

from .deformable_detr import DeformableDETR, build_deformable_detr
from .nested import NestedTensor, nested_tensor_from_tensor_list
from .postprocess import PostProcess, PostProcessSegm, build_postprocessors, topk_detections
from .segmentation import DeformableDETRSegm, build_segmentation_model

__all__ = ["DeformableDETR", "DeformableDETRSegm", "NestedTensor", "PostProcess", "PostProcessSegm",
           "build_model", "build_postprocessors", "nested_tensor_from_tensor_list", "topk_detections"]


def build_model(cfg, num_classes: int, load_weights: bool = True) -> nn.Module:
    """The image model the config describes (DATASETS.TYPE 'coco'): Deformable DETR, or the Deformable
    Mask Head when MODEL.MASK_ON. ``num_classes`` = number of sigmoid logits (91 for COCO).

    With ``load_weights``, ImageNet backbone weights come from MODEL.BACKBONE_WEIGHTS and the checkpoint
    from MODEL.WEIGHTS (both local files; converted as ``devis_core.checkpoint`` describes).
    """
    if cfg.DATASETS.TYPE != "coco":
        raise ValueError(f"build_model: DATASETS.TYPE {cfg.DATASETS.TYPE!r} needs the video model, which is not "
                         "part of devis_core.models yet; only 'coco' (image models) is built here")
    if cfg.MODEL.MASK_ON:
        from devis_core.matcher import build_matcher

        model: nn.Module = build_segmentation_model(cfg, num_classes, build_matcher(cfg))
    else:
        model = build_deformable_detr(cfg, num_classes)
    if load_weights:
        from devis_core import checkpoint

        checkpoint.load_initial_weights(model, cfg)
    return model
