"""Deformable transformer: multi-scale encoder, decoder with iterative box refinement, and their layers.

Layers take the attention hyper-parameters as plain arguments, including the optional temporal branch of
``MSDeformAttn`` (``temporal_points``, ``num_temporal_frames``), so the DeVIS video transformer is built
from these same classes.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .deformable_attention import MSDeformAttn
from .heads import refine_boxes


def valid_ratios(mask: Tensor) -> Tensor:
    """Fraction of non-padded columns / rows. mask: (B, H, W) bool True=pad. Returns (B, 2) float32
    (w ratio, h ratio) measured on the first row / column."""
    _, h, w = mask.shape
    # float32 on purpose: the official model keeps these ratios (and the encoder references) in
    # float32 even when run in float64.
    valid_h = (~mask[:, :, 0]).sum(1).float() / h
    valid_w = (~mask[:, 0, :]).sum(1).float() / w
    return torch.stack([valid_w, valid_h], -1)


def encoder_reference_points(spatial_shapes: Tensor, ratios: Tensor) -> Tensor:
    """Pixel centres of every level as encoder reference points.

    spatial_shapes: (L, 2) int64 (H_l, W_l); ratios: (B, L, 2) valid ratios (w, h).
    Returns (B, S, L, 2) float32: for token (l, i, j) the point ((j+0.5)/(r_w,l*W_l), (i+0.5)/(r_h,l*H_l)),
    rescaled by every level's own valid ratio.
    """
    refs = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        ys, xs = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=ratios.device),
                                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=ratios.device),
                                indexing="ij")
        ys = ys.reshape(-1)[None] / (ratios[:, None, lvl, 1] * h)
        xs = xs.reshape(-1)[None] / (ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack((xs, ys), -1))
    return torch.cat(refs, 1)[:, :, None] * ratios[:, None]


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention (``self_attn``, ``norm1``) then FFN (``linear1``,
    ``linear2``, ``norm2``)."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4, temporal_points: int = 0, num_temporal_frames: int = 0,
                 attention_backend: str = "auto"):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, temporal_points,
                                      num_temporal_frames, attention_backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor | None = None, **temporal) -> Tensor:
        """src, pos: (T, S, C); reference_points: (T, S, L, 2); padding_mask: (T, S) or None;
        ``temporal``: temporal_reference_points / temporal_frames for a temporal attention.
        Returns (T, S, C)."""
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index,
                              padding_mask, **temporal)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class DeformableDecoderLayer(nn.Module):
    """Post-norm layer: query self-attention (``self_attn``, ``norm2``), deformable cross-attention
    (``cross_attn``, ``norm1``), FFN (``linear1``, ``linear2``, ``norm3``). Names match the official
    checkpoints."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, n_levels: int = 4,
                 n_heads: int = 8, n_points: int = 4, temporal_points: int = 0, num_temporal_frames: int = 0,
                 attention_backend: str = "auto"):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, temporal_points,
                                       num_temporal_frames, attention_backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, padding_mask: Tensor | None = None,
                **temporal) -> Tensor:
        """tgt, query_pos: (B, Q, C); reference_points: (B, Q, L, 2|4) scaled by valid ratios;
        memory: (B, S, C); padding_mask: (B, S) or None. Returns (B, Q, C)."""
        q = (tgt + query_pos).transpose(0, 1)
        tgt2 = self.self_attn(q, q, tgt.transpose(0, 1), need_weights=False)[0].transpose(0, 1)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                               padding_mask, **temporal)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))


class DeformableEncoder(nn.Module):
    """A stack of encoder layers (``layers.{i}``) with pixel-centre reference points."""

    def __init__(self, layer: DeformableEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                ratios: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """src, pos: (B, S, C); ratios: (B, L, 2); padding_mask: (B, S). Returns memory (B, S, C)."""
        reference_points = encoder_reference_points(spatial_shapes, ratios)
        out = src
        for layer in self.layers:
            out = layer(out, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return out


class DeformableDecoder(nn.Module):
    """A stack of decoder layers (``layers.{i}``) with iterative box refinement.

    ``bbox_embed`` is set by the detector to its own per-layer box heads (the official "hack": the same
    modules are registered twice, so both state-dict keys exist). Without it the references stay fixed.
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int, bbx_gradient_prop: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.bbx_gradient_prop = bbx_gradient_prop
        self.bbox_embed: nn.ModuleList | None = None

    def forward(self, tgt: Tensor, reference_points: Tensor, memory: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, ratios: Tensor, query_pos: Tensor,
                padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """tgt, query_pos: (B, Q, C); reference_points: (B, Q, 2) initial points; memory: (B, S, C);
        ratios: (B, L, 2). Returns hs (D, B, Q, C) and the references after each layer (D, B, Q, 4)
        (or (D, B, Q, 2) without box refinement)."""
        out = tgt
        hs, refs = [], []
        for lid, layer in enumerate(self.layers):
            scale = torch.cat([ratios, ratios], -1) if reference_points.shape[-1] == 4 else ratios
            ref_in = reference_points[:, :, None] * scale[:, None]
            out = layer(out, query_pos, ref_in, memory, spatial_shapes, level_start_index, padding_mask)
            if self.bbox_embed is not None:
                new_ref = refine_boxes(self.bbox_embed[lid](out), reference_points)
                # BBX_GRADIENT_PROP: let the loss of later layers reach earlier box heads (DeVIS configs).
                reference_points = new_ref if self.bbx_gradient_prop else new_ref.detach()
            hs.append(out)
            refs.append(reference_points)
        return torch.stack(hs), torch.stack(refs)


class DeformableTransformer(nn.Module):
    """Level embedding + encoder + decoder over L flattened levels (``level_embed``, ``reference_points``,
    ``encoder``, ``decoder``)."""

    def __init__(self, d_model: int = 256, n_heads: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.1,
                 num_feature_levels: int = 4, enc_n_points: int = 4, dec_n_points: int = 4,
                 bbx_gradient_prop: bool = False, attention_backend: str = "auto"):
        super().__init__()
        self.d_model, self.n_heads = d_model, n_heads
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.reference_points = nn.Linear(d_model, 2)
        enc_layer = DeformableEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, n_heads,
                                           enc_n_points, attention_backend=attention_backend)
        self.encoder = DeformableEncoder(enc_layer, num_encoder_layers)
        dec_layer = DeformableDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, n_heads,
                                           dec_n_points, attention_backend=attention_backend)
        self.decoder = DeformableDecoder(dec_layer, num_decoder_layers, bbx_gradient_prop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official initialisation (xavier for matrices, attention modules' own scheme, N(0,1) level embed)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for mod in self.modules():
            if isinstance(mod, MSDeformAttn):
                mod.reset_parameters()
        nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
        nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def flatten_levels(self, srcs: list[Tensor], masks: list[Tensor], pos: list[Tensor]) -> dict:
        """Flatten L maps (B, C, H_l, W_l) row-major and concatenate in level order.

        Returns dict: src (B, S, C), pos (B, S, C) with level_embed added, mask (B, S), spatial_shapes
        (L, 2) int64, level_start_index (L,), valid_ratios (B, L, 2) float32.
        """
        shapes = torch.as_tensor([tuple(s.shape[-2:]) for s in srcs], dtype=torch.long, device=srcs[0].device)
        return {
            "src": torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1),
            "pos": torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                              for lvl, p in enumerate(pos)], 1),
            "mask": torch.cat([m.flatten(1) for m in masks], 1),
            "spatial_shapes": shapes,
            "level_start_index": torch.cat((shapes.new_zeros((1,)), shapes.prod(1).cumsum(0)[:-1])),
            "valid_ratios": torch.stack([valid_ratios(m) for m in masks], 1),
        }

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos: list[Tensor], query_embed: Tensor) -> dict:
        """srcs: L maps (B, C, H_l, W_l); masks: L (B, H_l, W_l) bool; pos: L (B, C, H_l, W_l);
        query_embed: (Q, 2C), first C columns positional, last C content.

        Returns dict: memory (B, S, C); memories: L maps (B, C, H_l, W_l); hs (D, B, Q, C);
        init_reference (B, Q, 2); inter_references (D, B, Q, 4); query_pos (B, Q, C); and the
        flattening info of ``flatten_levels``.
        """
        flat = self.flatten_levels(srcs, masks, pos)
        memory = self.encoder(flat["src"], flat["pos"], flat["spatial_shapes"], flat["level_start_index"],
                              flat["valid_ratios"], flat["mask"])
        b, _, c = memory.shape
        query_pos, tgt = torch.split(query_embed, c, dim=1)
        query_pos = query_pos.unsqueeze(0).expand(b, -1, -1)
        tgt = tgt.unsqueeze(0).expand(b, -1, -1)
        init_reference = self.reference_points(query_pos).sigmoid()
        hs, inter_references = self.decoder(tgt, init_reference, memory, flat["spatial_shapes"],
                                            flat["level_start_index"], flat["valid_ratios"], query_pos,
                                            flat["mask"])
        memories, start = [], 0
        for s in srcs:
            h, w = s.shape[-2:]
            memories.append(memory[:, start:start + h * w].transpose(1, 2).reshape(b, c, h, w))
            start += h * w
        return dict(flat, memory=memory, memories=memories, hs=hs, init_reference=init_reference,
                    inter_references=inter_references, query_pos=query_pos)


def build_transformer(cfg) -> DeformableTransformer:
    """The image deformable transformer from MODEL.* keys."""
    t = cfg.MODEL.TRANSFORMER
    return DeformableTransformer(
        d_model=cfg.MODEL.HIDDEN_DIM, n_heads=t.N_HEADS, num_encoder_layers=t.ENCODER_LAYERS,
        num_decoder_layers=t.DECODER_LAYERS, dim_feedforward=cfg.MODEL.DIM_FEEDFORWARD,
        dropout=cfg.MODEL.DROPOUT, num_feature_levels=cfg.MODEL.NUM_FEATURE_LEVELS,
        enc_n_points=t.ENC_N_POINTS, dec_n_points=t.DEC_N_POINTS,
        bbx_gradient_prop=cfg.MODEL.BBX_GRADIENT_PROP, attention_backend=cfg.MODEL.ATTENTION_BACKEND)
