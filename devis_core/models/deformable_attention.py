"""Multi-scale deformable attention module: projections, sampling locations, and an optional temporal branch.

The module turns queries into sampling offsets and attention weights, builds the final normalised
sampling locations around reference points and calls ``devis_core.attention.ms_deform_attn``.
The image model uses the current-frame branch only (the leading axis is the image batch). With
``temporal_points`` > 0 the same module also samples ``num_temporal_frames`` other frames of a clip
(DeVIS, spec §3): the current and temporal logits are soft-maxed jointly per head.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from devis_core.attention import default_temporal_frames, ms_deform_attn


def sampling_locations(reference_points: Tensor, offsets: Tensor, spatial_shapes: Tensor) -> Tensor:
    """Final normalised (x, y) sampling locations around reference points or boxes.

    reference_points: (T, Q, *slot, L, 2) normalised (x, y) or (T, Q, *slot, L, 4) normalised boxes
        (cx, cy, w, h); ``slot`` is empty for the current frame and (W,) for the temporal branch.
    offsets: (T, Q, M, *slot, L, P, 2) raw offsets from the Linear layer.
    spatial_shapes: (L, 2) int64 (H_l, W_l).
    Returns (T, Q, M, *slot, L, P, 2): point refs move by offset / (W_l, H_l); box refs move by
    offset / P * (w, h) / 2.
    """
    n_points = offsets.shape[-2]
    ref = reference_points[:, :, None, ..., None, :]  # head axis after Q, point axis after L
    if reference_points.shape[-1] == 2:
        normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1)[:, None, :]
        return ref + offsets / normalizer
    if reference_points.shape[-1] == 4:
        return ref[..., :2] + offsets / n_points * ref[..., 2:] * 0.5
    raise ValueError(f"reference_points: last dim must be 2 (points) or 4 (boxes), got shape "
                     f"{tuple(reference_points.shape)}")


def _grid_init_bias(n_heads: int, n_points: int, repeats: int) -> Tensor:
    """Initial offsets: head m points along angle 2*pi*m/M, point p at distance p+1 (Linf-normalised);
    layout (M, repeats, P, 2) flattened."""
    thetas = torch.arange(n_heads, dtype=torch.float32) * (2.0 * math.pi / n_heads)
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)
    grid = grid / grid.abs().max(-1, keepdim=True)[0]
    grid = grid.view(n_heads, 1, 1, 2).repeat(1, repeats, n_points, 1)
    grid = grid * torch.arange(1, n_points + 1, dtype=torch.float32).view(1, 1, n_points, 1)
    return grid.flatten()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR) with an optional DeVIS temporal branch.

    Parameter names follow the official state dicts: ``sampling_offsets`` (C -> M*L*P*2, layout
    (m, l, p, xy)), ``attention_weights`` (C -> M*L*P), ``value_proj``, ``output_proj``, and with the
    temporal branch ``temporal_sampling_offsets`` (C -> M*W*L*P_t*2, layout (m, w, l, p, xy)) and
    ``temporal_attention_weights`` (C -> M*W*L*P_t).

    With ``capture`` set (``devis_core.attention_maps.capture_attention``) each forward leaves its final
    sampling locations, attention weights and references in ``last_attention`` (see ``_record``).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 temporal_points: int = 0, num_temporal_frames: int = 0, backend: str = "auto"):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"MSDeformAttn: d_model {d_model} is not divisible by n_heads {n_heads}")
        if (temporal_points > 0) != (num_temporal_frames > 0):
            raise ValueError("MSDeformAttn: temporal_points and num_temporal_frames must both be > 0 "
                             f"or both 0, got {temporal_points} and {num_temporal_frames}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.temporal_points, self.num_temporal_frames = temporal_points, num_temporal_frames
        self.backend = backend
        # Opt-in record of the last forward's locations and weights for attention maps
        # (devis_core.attention_maps.capture_attention); off, it costs one attribute test per forward.
        self.capture = False
        self.last_attention: dict[str, Tensor] | None = None
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        if self.has_temporal:
            n_t = n_heads * num_temporal_frames * n_levels * temporal_points
            self.temporal_sampling_offsets = nn.Linear(d_model, n_t * 2)
            self.temporal_attention_weights = nn.Linear(d_model, n_t)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @property
    def has_temporal(self) -> bool:
        return self.temporal_points > 0

    def reset_parameters(self) -> None:
        """Official initialisation: zero offset weights with the radial bias pattern, uniform attention,
        xavier value/output projections."""
        with torch.no_grad():
            nn.init.zeros_(self.sampling_offsets.weight)
            self.sampling_offsets.bias.copy_(_grid_init_bias(self.n_heads, self.n_points, self.n_levels))
            nn.init.zeros_(self.attention_weights.weight)
            nn.init.zeros_(self.attention_weights.bias)
            if self.has_temporal:
                nn.init.zeros_(self.temporal_sampling_offsets.weight)
                # The bias depends on head and point only, so the slot/level order is immaterial.
                self.temporal_sampling_offsets.bias.copy_(_grid_init_bias(
                    self.n_heads, self.temporal_points, self.num_temporal_frames * self.n_levels))
                nn.init.zeros_(self.temporal_attention_weights.weight)
                nn.init.zeros_(self.temporal_attention_weights.bias)
            nn.init.xavier_uniform_(self.value_proj.weight)
            nn.init.zeros_(self.value_proj.bias)
            nn.init.xavier_uniform_(self.output_proj.weight)
            nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value_input: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor | None = None,
                temporal_reference_points: Tensor | None = None,
                temporal_frames: Tensor | None = None) -> Tensor:
        """Attend from queries to the multi-scale maps.

        query: (T, Q, C) queries (with positional embedding added); T = images (or frames of a clip).
        reference_points: (T, Q, L, 2) normalised (x, y) or (T, Q, L, 4) boxes (cx, cy, w, h), already
            scaled by the valid ratios.
        value_input: (T, S, C) flattened maps of all levels, S = sum_l H_l*W_l.
        spatial_shapes: (L, 2) int64 (H_l, W_l); level_start_index: (L,) int64.
        padding_mask: (T, S) bool, True where the value is padding (zeroed), or None.
        temporal_reference_points: (T, Q, W, L, 2|4), the reference of query (t, q) in slot w (temporal
            branch only; required when the module has one).
        temporal_frames: (T, W) int64 frame of each slot (default: the other frames in ascending order).
        Returns (T, Q, C).
        """
        t, q, _ = query.shape
        s = value_input.shape[1]
        m, lv, p = self.n_heads, self.n_levels, self.n_points
        # The token count against spatial_shapes is checked by ms_deform_attn on a cached host copy;
        # checking it here too would read the device every layer.
        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(t, s, m, self.d_model // m)

        offsets = self.sampling_offsets(query).view(t, q, m, lv, p, 2)
        logits = self.attention_weights(query).view(t, q, m, lv * p)
        loc = sampling_locations(reference_points, offsets, spatial_shapes)
        if not self.has_temporal:
            attn = F.softmax(logits, -1).view(t, q, m, lv, p)
            if self.capture:
                self._record(loc, attn, reference_points)
            out = ms_deform_attn(value, spatial_shapes, level_start_index, loc, attn, backend=self.backend)
            return self.output_proj(out)

        if temporal_reference_points is None:
            raise ValueError("MSDeformAttn: this module has a temporal branch; temporal_reference_points "
                             "(T, Q, W, L, 2|4) is required")
        w, pt = self.num_temporal_frames, self.temporal_points
        t_offsets = self.temporal_sampling_offsets(query).view(t, q, m, w, lv, pt, 2)
        t_logits = self.temporal_attention_weights(query).view(t, q, m, w * lv * pt)
        # One softmax over current and temporal logits together: the two branches share each head's mass.
        joint = F.softmax(torch.cat([logits, t_logits], -1), -1)
        attn = joint[..., : lv * p].reshape(t, q, m, lv, p)
        t_attn = joint[..., lv * p:].reshape(t, q, m, w, lv, pt)
        t_loc = sampling_locations(temporal_reference_points, t_offsets, spatial_shapes)
        if self.capture:
            if temporal_frames is None:
                temporal_frames = default_temporal_frames(t, query.device)
            self._record(loc, attn, reference_points, t_loc, t_attn, temporal_reference_points, temporal_frames)
        out = ms_deform_attn(value, spatial_shapes, level_start_index, loc, attn, t_loc, t_attn,
                             temporal_frames, backend=self.backend)
        return self.output_proj(out)

    def _record(self, loc: Tensor, attn: Tensor, reference_points: Tensor, t_loc: Tensor | None = None,
                t_attn: Tensor | None = None, temporal_reference_points: Tensor | None = None,
                temporal_frames: Tensor | None = None) -> None:
        """Keep what the op was given, detached, in ``last_attention``: locations (T, Q, M, L, P, 2),
        weights (T, Q, M, L, P), references (T, Q, L, 2|4) and, with the temporal branch,
        temporal_locations (T, Q, M, W, L, P_t, 2), temporal_weights (T, Q, M, W, L, P_t),
        temporal_references (T, Q, W, L, 2|4), temporal_frames (T, W)."""
        record = {"locations": loc, "weights": attn, "references": reference_points}
        if t_loc is not None:
            record.update(temporal_locations=t_loc, temporal_weights=t_attn,
                          temporal_references=temporal_reference_points, temporal_frames=temporal_frames)
        self.last_attention = {k: v.detach() for k, v in record.items()}
