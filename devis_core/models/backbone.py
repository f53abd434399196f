"""ResNet backbone with frozen batch norm, returning the /4, /8, /16, /32 stages with their padding masks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from .nested import NestedTensor
from .position_encoding import PositionEmbeddingSine, build_position_encoding

STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")
STAGE_CHANNELS = {"resnet50": (256, 512, 1024, 2048), "resnet101": (256, 512, 1024, 2048)}


BACKBONE_NORMS = ("frozen_bn", "group_norm")


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine terms, all buffers: y = x*s + (b - mean*s),
    s = weight / sqrt(var + 1e-5)."""

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))
        self._affine: tuple | None = None     # (key, scale, shift), see _scale_shift

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # ImageNet/BatchNorm2d state dicts carry a counter that has no meaning for frozen statistics.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _scale_shift(self) -> tuple[Tensor, Tensor]:
        """(scale, shift), each (1, C, 1, 1), recomputed only when a buffer changed (load_state_dict,
        .to(), an in-place edit: the key holds each buffer's storage and version counter). The buffers
        never train, so the same values would otherwise be recomputed by four small kernels in every
        forward of every one of the ResNet's 53 norm layers."""
        bufs = (self.weight, self.bias, self.running_mean, self.running_var)
        key = tuple((b.data_ptr(), b._version, b.dtype, b.device) for b in bufs)
        if self._affine is None or self._affine[0] != key:
            with torch.no_grad():
                scale = self.weight * (self.running_var + 1e-5).rsqrt()
                shift = self.bias - self.running_mean * scale
            self._affine = (key, scale[None, :, None, None], shift[None, :, None, None])
        return self._affine[1], self._affine[2]

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        scale, shift = self._scale_shift()
        return x * scale + shift


def downsample_mask(mask: Tensor, size) -> Tensor:
    """Nearest resize of a padding mask. mask: (B, H, W) bool -> (B, h, w) bool."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


def _group_norm(n: int) -> nn.GroupNorm:
    # 32 groups as in the group-norm paper; every ResNet width (64 .. 2048) divides by 32
    return nn.GroupNorm(32, n)


class ResNetBody(nn.Module):
    """torchvision ResNet without its classifier; state names ``body.conv1.weight``, ``body.layer1.0...``."""

    def __init__(self, name: str = "resnet50", dilation: bool = False, train_backbone: bool = True,
                 norm: str = "frozen_bn"):
        super().__init__()
        if name not in STAGE_CHANNELS:
            raise ValueError(f"MODEL.BACKBONE is {name!r}; this workbench supports {sorted(STAGE_CHANNELS)}")
        if norm not in BACKBONE_NORMS:
            raise ValueError(f"MODEL.BACKBONE_NORM is {norm!r}; expected one of {BACKBONE_NORMS}")
        norm_layer = FrozenBatchNorm2d if norm == "frozen_bn" else _group_norm
        resnet = getattr(torchvision.models, name)(weights=None, replace_stride_with_dilation=[False, False, dilation],
                                                   norm_layer=norm_layer)
        self.body = nn.ModuleDict({k: getattr(resnet, k) for k in
                                   ("conv1", "bn1", "relu", "maxpool") + STAGE_NAMES})
        self.num_channels = list(STAGE_CHANNELS[name])
        self.strides = [4, 8, 16, 16 if dilation else 32]
        for pname, p in self.body.named_parameters():
            # Official rule: the stem and layer1 never train; with LR_BACKBONE == 0 nothing does. From
            # random initialisation (group norm) a frozen random stem would only throw information away.
            trainable = train_backbone and (norm == "group_norm"
                                            or any(s in pname for s in ("layer2", "layer3", "layer4")))
            p.requires_grad_(trainable)

    def forward(self, samples: NestedTensor) -> list[NestedTensor]:
        """samples: images (B, 3, H, W) + mask (B, H, W). Returns the 4 stages (strides 4, 8, 16, 32) as
        NestedTensors with (B, C_i, ceil(H/s), ceil(W/s)) maps and resized masks."""
        b = self.body
        x = b["maxpool"](b["relu"](b["bn1"](b["conv1"](samples.tensors))))
        out = []
        for name in STAGE_NAMES:
            x = b[name](x)
            out.append(NestedTensor(x, downsample_mask(samples.mask, x.shape[-2:])))
        return out


class Joiner(nn.Sequential):
    """Index 0 = ResNet (state prefix ``backbone.0.body``), index 1 = position encoding (``backbone.1``)."""

    def __init__(self, body: ResNetBody, position_embedding: PositionEmbeddingSine):
        super().__init__(body, position_embedding)
        self.num_channels = body.num_channels
        self.strides = body.strides

    def forward(self, samples: NestedTensor) -> tuple[list[NestedTensor], list[Tensor]]:
        """Returns the 4 backbone stages and their position encodings (B, C_pos, h_i, w_i) in the
        features' dtype."""
        features = self[0](samples)
        pos = [self[1](f.mask, dtype=f.tensors.dtype) for f in features]
        return features, pos


def build_backbone(cfg) -> Joiner:
    """ResNet (MODEL.BACKBONE, MODEL.BACKBONE_DILATION, MODEL.BACKBONE_NORM) + position encoding;
    trainable iff SOLVER.LR_BACKBONE != 0. ImageNet weights are loaded by ``devis_core.checkpoint`` from
    MODEL.BACKBONE_WEIGHTS (never downloaded)."""
    body = ResNetBody(cfg.MODEL.BACKBONE, cfg.MODEL.BACKBONE_DILATION, train_backbone=cfg.SOLVER.LR_BACKBONE != 0,
                      norm=cfg.MODEL.BACKBONE_NORM)
    return Joiner(body, build_position_encoding(cfg))
