"""Sine positional encoding of feature maps (DeVIS variant: no -0.5 offset), optional learned per-frame term."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """2-D sine/cosine encoding of the non-padded cumulative pixel counts, y block then x block.

    With ``num_frames`` > 0 a learned ``temporal_embed`` (num_frames, 2*num_pos_feats) row is added to
    frame t (the batch axis is then the frame axis of one clip), as in DeVIS.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float | None = None, num_frames: int = 0):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.num_frames = num_frames
        if num_frames > 0:
            self.temporal_embed = nn.Parameter(torch.empty(num_frames, 2 * num_pos_feats))
            nn.init.normal_(self.temporal_embed)

    def forward(self, mask: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """mask: (B, H, W) bool, True on padding. Returns (B, 2*num_pos_feats, H, W) in ``dtype``
        (default float32)."""
        # Computed in float32 whatever the model dtype, then cast: the official code does this, and
        # float64 parity depends on it.
        not_mask = ~mask
        y = not_mask.cumsum(1, dtype=torch.float32)
        x = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            # No -0.5 offset here (DETR/VisTR style): all DeVIS checkpoints were trained this way.
            eps = 1e-6
            y = y / (y[:, -1:, :] + eps) * self.scale
            x = x / (x[:, :, -1:] + eps) * self.scale
        k = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x[..., None] / dim_t
        pos_y = y[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
        if dtype is not None:
            pos = pos.to(dtype)
        if self.num_frames > 0:
            if mask.shape[0] != self.num_frames:
                raise ValueError(f"PositionEmbeddingSine: learned temporal embedding for {self.num_frames} "
                                 f"frames, got a batch of {mask.shape[0]} frames")
            pos = pos + self.temporal_embed[:, :, None, None]
        return pos


def build_position_encoding(cfg) -> PositionEmbeddingSine:
    """Image models: sine over HIDDEN_DIM channels; DATASETS.TYPE 'vis': plus the learned temporal term."""
    num_frames = 0
    if cfg.DATASETS.TYPE == "vis":
        if cfg.MODEL.DEVIS.TEMPORAL_EMBEDDING != "learned":
            raise ValueError(f"MODEL.DEVIS.TEMPORAL_EMBEDDING is {cfg.MODEL.DEVIS.TEMPORAL_EMBEDDING!r}; only "
                             "'learned' is supported (the official 'sine' option is broken, spec §1.2)")
        num_frames = cfg.MODEL.DEVIS.NUM_FRAMES
    return PositionEmbeddingSine(cfg.MODEL.HIDDEN_DIM // 2, normalize=True, num_frames=num_frames)
