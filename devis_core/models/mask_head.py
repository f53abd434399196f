"""Deformable Mask Head blocks: multi-scale attention maps and the FPN-like (modulated deformable) conv head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn


class ModulatedDeformableConv2d(nn.Module):
    """3x3 modulated deformable conv (DCNv2): offsets and a 2*sigmoid modulation predicted from the input
    by zero-initialised convs (``offset_conv``, ``modulator_conv``), bias-free ``regular_conv`` weights."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.padding = padding
        taps = kernel_size * kernel_size
        self.offset_conv = nn.Conv2d(in_channels, 2 * taps, kernel_size, padding=padding, bias=True)
        self.modulator_conv = nn.Conv2d(in_channels, taps, kernel_size, padding=padding, bias=True)
        for conv in (self.offset_conv, self.modulator_conv):
            # Zero init: the layer starts as a plain conv (offsets 0, modulation 2*sigmoid(0) = 1).
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.regular_conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C_in, H, W) -> (N, C_out, H, W)."""
        offset = self.offset_conv(x)
        modulator = 2.0 * torch.sigmoid(self.modulator_conv(x))
        return torchvision.ops.deform_conv2d(x, offset, self.regular_conv.weight, None, padding=self.padding,
                                             mask=modulator)


def plain_conv(in_channels: int, out_channels: int, kernel_size: int, padding: int) -> nn.Conv2d:
    """Conv with bias, kaiming-uniform (a=1) weights and zero bias (the official mask-head init)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding)
    nn.init.kaiming_uniform_(conv.weight, a=1)
    nn.init.zeros_(conv.bias)
    return conv


class MultiScaleMHAttentionMap(nn.Module):
    """Per-head attention of query embeddings over encoder maps at several scales (``q_linear``,
    ``k_linear``, ``q_linear_1``, ``k_linear_1``, ...), soft-maxed over heads and positions jointly."""

    def __init__(self, query_dim: int = 256, hidden_dim: int = 256, num_heads: int = 8, num_levels: int = 3):
        super().__init__()
        self.num_heads, self.hidden_dim, self.num_levels = num_heads, hidden_dim, num_levels
        for i in range(num_levels):
            suffix = "" if i == 0 else f"_{i}"
            for kind in ("q_linear", "k_linear"):
                lin = nn.Linear(query_dim, hidden_dim)
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
                setattr(self, kind + suffix, lin)
        self.normalize_fact = float(hidden_dim / num_heads) ** -0.5

    def forward(self, queries: Tensor, keys: list[Tensor], batch_index: Tensor,
                masks: list[Tensor] | None = None) -> list[Tensor]:
        """queries: (N, C) embeddings; keys: per level (B, C, H_j, W_j) maps; batch_index: (N,) int64 image
        of each query; masks: per level (B, H_j, W_j) bool True=pad, or None.
        Returns per level (N, M, H_j, W_j) attention maps (each sums to 1 over heads and positions)."""
        if len(keys) != self.num_levels:
            raise ValueError(f"MultiScaleMHAttentionMap: expected {self.num_levels} key maps, got {len(keys)}")
        n, m, d = queries.shape[0], self.num_heads, self.hidden_dim // self.num_heads
        out = []
        for i, k in enumerate(keys):
            suffix = "" if i == 0 else f"_{i}"
            q_lin, k_lin = getattr(self, "q_linear" + suffix), getattr(self, "k_linear" + suffix)
            q = q_lin(queries).view(n, m, d)
            # The key projection is the Linear applied per pixel (a 1x1 conv with the same weights).
            kk = F.conv2d(k, k_lin.weight[:, :, None, None], k_lin.bias)
            kk = kk.view(k.shape[0], m, d, k.shape[-2], k.shape[-1])[batch_index]
            w = torch.einsum("nmd,nmdhw->nmhw", q * self.normalize_fact, kk)
            if masks is not None:
                w = w.masked_fill(masks[i][batch_index][:, None], float("-inf"))
            out.append(F.softmax(w.flatten(1), dim=-1).view_as(w))
        return out


class MaskHeadConv(nn.Module):
    """FPN-like head: coarsest map + attention maps, then upsample-and-add adapted finer maps, one logit
    map at the finest scale. State names ``lay1..``, ``gn1..``, ``adapter1..``, ``out_lay``."""

    def __init__(self, dim: int = 256, fpn_dims: tuple[int, ...] = (256, 256, 256), num_heads: int = 8,
                 use_mdc: bool = True, num_att_maps: int = 3):
        super().__init__()
        num_levels = len(fpn_dims) + 1
        out_dims = [dim // (2 ** e) for e in range(num_levels + 2)]
        in_dims = [d + (num_heads if i < num_att_maps else 0) for i, d in enumerate(out_dims)]
        self.num_levels, self.num_att_maps = num_levels, num_att_maps
        self.multi_scale_att_maps = num_att_maps > 1

        def conv(cin, cout):
            return ModulatedDeformableConv2d(cin, cout, 3, 1) if use_mdc else plain_conv(cin, cout, 3, 1)

        self.lay1, self.gn1 = conv(in_dims[0], in_dims[0]), nn.GroupNorm(8, in_dims[0])
        self.lay2, self.gn2 = conv(in_dims[0], out_dims[1]), nn.GroupNorm(8, out_dims[1])
        for i in range(1, num_levels):
            setattr(self, f"lay{i + 2}", conv(in_dims[i], out_dims[i + 1]))
            setattr(self, f"gn{i + 2}", nn.GroupNorm(8, out_dims[i + 1]))
            setattr(self, f"adapter{i}", plain_conv(fpn_dims[i - 1], out_dims[i], 1, 0))
        self.out_lay = conv(out_dims[num_levels], 1)

    def forward(self, features: list[Tensor], att_maps: list[Tensor], batch_index: Tensor) -> Tensor:
        """features: num_levels maps (B, C_i, H_i, W_i), coarsest first; att_maps: (N, M, H_j, W_j) for the
        first ``num_att_maps`` scales; batch_index: (N,) image of each instance.
        Returns (N, 1, H_last, W_last) mask logits."""
        x = torch.cat([features[0][batch_index], att_maps[0]], 1)
        x = F.relu(self.gn1(self.lay1(x)))
        x = F.relu(self.gn2(self.lay2(x)))
        for lvl, feat in enumerate(features[1:]):
            # Adapt before expanding to instances: the same values, computed once per image.
            fpn = getattr(self, f"adapter{lvl + 1}")(feat)[batch_index]
            # Legacy 'nearest' (floor indexing), not 'nearest-exact': the official upsampling.
            x = fpn + F.interpolate(x, size=fpn.shape[-2:], mode="nearest")
            if self.multi_scale_att_maps and lvl + 1 < len(att_maps):
                x = torch.cat([x, att_maps[lvl + 1]], 1)
            x = F.relu(getattr(self, f"gn{lvl + 3}")(getattr(self, f"lay{lvl + 3}")(x)))
        return self.out_lay(x)
