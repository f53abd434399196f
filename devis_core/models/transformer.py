"""Deformable transformer: multi-scale encoder, decoder with iterative box refinement, and their layers.

Layers take the attention hyper-parameters as plain arguments, including the optional temporal branch of
``MSDeformAttn`` (``temporal_points``, ``num_temporal_frames``), so the DeVIS video transformer is built
from these same classes.
"""
from __future__ import annotations

import copy
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from devis_core.attention import default_temporal_frames, windowed_temporal_frames

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


class LevelLayout(NamedTuple):
    """Constants of one set of level sizes on one device (cached by the transformer per shapes/device).

    spatial_shapes: (L, 2) int64 (H_l, W_l); level_start_index: (L,) int64; centres: (S, 2) float32
    pixel centres (j+0.5, i+0.5) of every token, levels flattened row-major in order; token_level: (S,)
    int64 level of every token; extent: (S, 2) float32 (W_l, H_l) of every token's level.
    """
    spatial_shapes: Tensor
    level_start_index: Tensor
    centres: Tensor
    token_level: Tensor
    extent: Tensor


def level_layout(shapes: Sequence[tuple[int, int]], device=None) -> LevelLayout:
    """Build the :class:`LevelLayout` of levels ``shapes`` = [(H_l, W_l), ...] on ``device``."""
    centres, token_level, extent = [], [], []
    for lvl, (h, w) in enumerate(shapes):
        # linspace, not arange + 0.5: the official values, bit for bit.
        ys, xs = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                                indexing="ij")
        centres.append(torch.stack((xs.reshape(-1), ys.reshape(-1)), -1))
        token_level.append(torch.full((h * w,), lvl, dtype=torch.long, device=device))
        extent.append(torch.tensor([float(w), float(h)], dtype=torch.float32, device=device).expand(h * w, 2))
    spatial_shapes = torch.as_tensor(list(shapes), dtype=torch.long, device=device).reshape(-1, 2)
    sizes = spatial_shapes.prod(1)
    return LevelLayout(spatial_shapes, torch.cat((sizes.new_zeros((1,)), sizes.cumsum(0)[:-1])),
                       torch.cat(centres), torch.cat(token_level), torch.cat(extent))


def encoder_reference_points(spatial_shapes: Tensor, ratios: Tensor, layout: LevelLayout | None = None) -> Tensor:
    """Pixel centres of every level as encoder reference points.

    spatial_shapes: (L, 2) int64 (H_l, W_l); ratios: (B, L, 2) valid ratios (w, h); layout: the
    :class:`LevelLayout` of these shapes (built here when None, which reads the shapes on the host).
    Returns (B, S, L, 2) float32: for token (l, i, j) the point ((j+0.5)/(r_w,l*W_l), (i+0.5)/(r_h,l*H_l)),
    rescaled by every level's own valid ratio.
    """
    if layout is None:
        layout = level_layout([tuple(hw) for hw in spatial_shapes.tolist()], ratios.device)
    refs = layout.centres / (ratios[:, layout.token_level] * layout.extent)      # (B, S, 2)
    return refs[:, :, None] * ratios[:, None]


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
                 attention_backend: str = "auto", clip_self_attention: bool = False):
        super().__init__()
        # DeVIS: the leading axis holds the frames of ONE clip and self-attention spans all of their
        # queries jointly (spec §4); for images it is a batch of independent query sets.
        self.clip_self_attention = clip_self_attention
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
        memory: (B, S, C); padding_mask: (B, S) or None. With ``clip_self_attention`` B is the frame
        axis T of one clip and the self-attention runs over all T*Q queries (frame-major).
        Returns (B, Q, C)."""
        b, nq, c = tgt.shape
        seq = (1, b * nq, c) if self.clip_self_attention else (b, nq, c)
        q = (tgt + query_pos).reshape(seq).transpose(0, 1)
        tgt2 = self.self_attn(q, q, tgt.reshape(seq).transpose(0, 1), need_weights=False)[0]
        tgt2 = tgt2.transpose(0, 1).reshape(b, nq, c)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                               padding_mask, **temporal)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))


class DeformableEncoder(nn.Module):
    """A stack of encoder layers (``layers.{i}``) with pixel-centre reference points.

    The first ``checkpoint_layers`` layers (MODEL.TRANSFORMER.CHECKPOINT_ENCODER_LAYERS; -1: all) drop
    their activations after their forward in training and recompute them in the backward: the encoder
    runs over every pixel of every frame, so its sampling offsets, attention weights and feed-forward
    activations are most of a DeVIS training step's memory. Same numbers (dropout's RNG state is
    replayed), one more layer forward of time per checkpointed layer.
    """

    def __init__(self, layer: DeformableEncoderLayer, num_layers: int, checkpoint_layers: int = 0):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        if checkpoint_layers < -1 or checkpoint_layers > num_layers:
            raise ValueError(f"MODEL.TRANSFORMER.CHECKPOINT_ENCODER_LAYERS is {checkpoint_layers}; expected -1 "
                             f"(all) or 0..{num_layers} (the encoder has {num_layers} layers)")
        self.checkpoint_layers = num_layers if checkpoint_layers == -1 else int(checkpoint_layers)

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                ratios: Tensor, padding_mask: Tensor | None = None,
                temporal_frames: Tensor | None = None, layout: LevelLayout | None = None) -> Tensor:
        """src, pos: (B, S, C); ratios: (B, L, 2); padding_mask: (B, S).
        temporal_frames: (T, W) int64 frame read by slot w of frame t (B = T frames of one clip) for
        temporal layers, else None. layout: the cached :class:`LevelLayout` of ``spatial_shapes``
        (optional). Returns memory (B, S, C)."""
        reference_points = encoder_reference_points(spatial_shapes, ratios, layout)
        temporal = {}
        if temporal_frames is not None:
            # A token samples the other frames around its own position: the level-0 copy of its
            # reference, the same for every slot and level (spec §3.4).
            t, s, n_levels, _ = reference_points.shape
            ref0 = reference_points[:, :, None, :1].expand(t, s, temporal_frames.shape[1], n_levels, 2)
            temporal = {"temporal_reference_points": ref0, "temporal_frames": temporal_frames}
        out = src
        recompute = self.checkpoint_layers if self.training and torch.is_grad_enabled() else 0
        for i, layer in enumerate(self.layers):
            if i < recompute:
                out = torch.utils.checkpoint.checkpoint(layer, out, pos, reference_points, spatial_shapes,
                                                        level_start_index, padding_mask, use_reentrant=False,
                                                        **temporal)
            else:
                out = layer(out, pos, reference_points, spatial_shapes, level_start_index, padding_mask, **temporal)
        return out


class DeformableDecoder(nn.Module):
    """A stack of decoder layers (``layers.{i}``) with iterative box refinement.

    ``bbox_embed`` is set by the detector to its own per-layer box heads (the official "hack": the same
    modules are registered twice, so both state-dict keys exist). Without it the references stay fixed.
    """

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int, bbx_gradient_prop: bool = False,
                 instance_aware: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.bbx_gradient_prop = bbx_gradient_prop
        # Temporal cross-attention only: query (t, i) samples frame t' around the reference of (t', i)
        # when instance-aware, else around its own reference (spec §3.5).
        self.instance_aware = instance_aware
        self.bbox_embed: nn.ModuleList | None = None

    def forward(self, tgt: Tensor, reference_points: Tensor, memory: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, ratios: Tensor, query_pos: Tensor,
                padding_mask: Tensor | None = None,
                temporal_frames: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """tgt, query_pos: (B, Q, C); reference_points: (B, Q, 2) initial points; memory: (B, S, C);
        ratios: (B, L, 2); temporal_frames: (T, W) int64 other-frame slots when B = T frames of one
        clip and the layers are temporal, else None. Returns hs (D, B, Q, C) and the references after
        each layer (D, B, Q, 4) (or (D, B, Q, 2) without box refinement)."""
        out = tgt
        hs, refs = [], []
        # Valid-ratio scale of 2-d points and of boxes, built once for all layers.
        scales = {2: ratios[:, None], 4: torch.cat([ratios, ratios], -1)[:, None]}
        for lid, layer in enumerate(self.layers):
            ref_in = reference_points[:, :, None] * scales[reference_points.shape[-1]]
            temporal = {}
            if temporal_frames is not None:
                temporal = {"temporal_reference_points": self.temporal_references(ref_in, temporal_frames),
                            "temporal_frames": temporal_frames}
            out = layer(out, query_pos, ref_in, memory, spatial_shapes, level_start_index, padding_mask,
                        **temporal)
            if self.bbox_embed is not None:
                new_ref = refine_boxes(self.bbox_embed[lid](out), reference_points)
                # BBX_GRADIENT_PROP: let the loss of later layers reach earlier box heads (DeVIS configs).
                reference_points = new_ref if self.bbx_gradient_prop else new_ref.detach()
            hs.append(out)
            refs.append(reference_points)
        return torch.stack(hs), torch.stack(refs)

    def temporal_references(self, ref_in: Tensor, temporal_frames: Tensor) -> Tensor:
        """References of the temporal slots. ref_in: (T, Q, L, 2|4); temporal_frames: (T, W).
        Returns (T, Q, W, L, 2|4): entry [t, i, w] = ref_in[temporal_frames[t, w], i] (instance-aware)
        or ref_in[t, i] (every slot around the query's own reference)."""
        t, q = ref_in.shape[:2]
        w = temporal_frames.shape[1]
        if self.instance_aware:
            return ref_in[temporal_frames].permute(0, 2, 1, 3, 4)
        return ref_in[:, :, None].expand(t, q, w, *ref_in.shape[2:])


class DeformableTransformer(nn.Module):
    """Level embedding + encoder + decoder over L flattened levels (``level_embed``, ``reference_points``,
    ``encoder``, ``decoder``).

    With ``num_frames`` = T > 0 it is the DeVIS video transformer (spec §1.9, §3): the batch axis is the
    T frames of one clip, encoder self-attention samples ``enc_temporal_points`` points per level in
    each other frame (all T-1 others, or ``enc_temporal_window`` mirrored neighbours), the T*N_q
    queries (frame-major) self-attend jointly and cross-attend with ``dec_temporal_points`` per level
    in every other frame (instance-aware or not). Temporal points 0 switch a branch off.
    """

    def __init__(self, d_model: int = 256, n_heads: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.1,
                 num_feature_levels: int = 4, enc_n_points: int = 4, dec_n_points: int = 4,
                 bbx_gradient_prop: bool = False, attention_backend: str = "auto", num_frames: int = 0,
                 enc_temporal_points: int = 0, dec_temporal_points: int = 0, enc_temporal_window: int = 0,
                 instance_aware: bool = True, checkpoint_encoder_layers: int = 0):
        super().__init__()
        if num_frames == 0 and (enc_temporal_points or dec_temporal_points):
            raise ValueError("DeformableTransformer: temporal points need num_frames > 0 (a video clip)")
        if num_frames == 1 and (enc_temporal_points or dec_temporal_points):
            raise ValueError("DeformableTransformer: a 1-frame clip has no other frame to sample; set the "
                             "temporal points to 0")
        self.d_model, self.n_heads = d_model, n_heads
        self.num_frames = num_frames
        self.enc_temporal_window = enc_temporal_window
        enc_slots = (enc_temporal_window or num_frames - 1) if enc_temporal_points else 0
        dec_slots = num_frames - 1 if dec_temporal_points else 0
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.reference_points = nn.Linear(d_model, 2)
        enc_layer = DeformableEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, n_heads,
                                           enc_n_points, enc_temporal_points, enc_slots,
                                           attention_backend=attention_backend)
        self.encoder = DeformableEncoder(enc_layer, num_encoder_layers, checkpoint_layers=checkpoint_encoder_layers)
        dec_layer = DeformableDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, n_heads,
                                           dec_n_points, dec_temporal_points, dec_slots,
                                           attention_backend=attention_backend,
                                           clip_self_attention=num_frames > 0)
        self.decoder = DeformableDecoder(dec_layer, num_decoder_layers, bbx_gradient_prop, instance_aware)
        # Per-forward constants (level layouts, frame-slot tables), cached per shapes / device: building
        # them costs dozens of small ops and a device-to-host read every forward. Plain dicts, not
        # buffers, so they stay out of state dicts; they hold nothing that training changes.
        self._layout_cache: dict[tuple, LevelLayout] = {}
        self._frames_cache: dict[str, tuple[Tensor | None, Tensor | None]] = {}
        self.reset_parameters()

    def temporal_frames(self, device=None) -> tuple[Tensor | None, Tensor | None]:
        """Other-frame slots (T, W) int64 of the encoder and decoder (None where a branch is off),
        built once per device (callers must not modify them)."""
        key = str(torch.device(device) if device is not None else torch.device("cpu"))
        if key not in self._frames_cache:
            self._frames_cache[key] = self._build_temporal_frames(device)
        return self._frames_cache[key]

    def _build_temporal_frames(self, device) -> tuple[Tensor | None, Tensor | None]:
        enc = self.encoder.layers[0].self_attn
        dec = self.decoder.layers[0].cross_attn
        enc_frames = dec_frames = None
        if enc.has_temporal:
            enc_frames = (windowed_temporal_frames(self.num_frames, self.enc_temporal_window, device)
                          if self.enc_temporal_window else default_temporal_frames(self.num_frames, device))
        if dec.has_temporal:
            dec_frames = default_temporal_frames(self.num_frames, device)
        return enc_frames, dec_frames

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
        (L, 2) int64, level_start_index (L,), valid_ratios (B, L, 2) float32, layout (the cached
        :class:`LevelLayout`; its tensors are shared between calls and must not be modified).
        """
        layout = self.layout(tuple(tuple(s.shape[-2:]) for s in srcs), srcs[0].device)
        return {
            "src": torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1),
            "pos": torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                              for lvl, p in enumerate(pos)], 1),
            "mask": torch.cat([m.flatten(1) for m in masks], 1),
            "spatial_shapes": layout.spatial_shapes,
            "level_start_index": layout.level_start_index,
            "valid_ratios": torch.stack([valid_ratios(m) for m in masks], 1),
            "layout": layout,
        }

    def layout(self, shapes: tuple[tuple[int, int], ...], device) -> LevelLayout:
        """The cached :class:`LevelLayout` of level sizes ``shapes`` on ``device``."""
        key = (shapes, str(device))
        hit = self._layout_cache.get(key)
        if hit is None:
            if len(self._layout_cache) >= 16:      # many input sizes (multi-scale training): stay bounded
                self._layout_cache.clear()
            hit = self._layout_cache[key] = level_layout(shapes, device)
        return hit

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos: list[Tensor], query_embed: Tensor) -> dict:
        """srcs: L maps (B, C, H_l, W_l); masks: L (B, H_l, W_l) bool; pos: L (B, C, H_l, W_l);
        query_embed: (Q, 2C), first C columns positional, last C content. Video (num_frames = T): B = T
        frames of one clip and Q = T*N_q rows, frame-major (row t*N_q + i = slot i of frame t).

        Returns dict: memory (B, S, C); memories: L maps (B, C, H_l, W_l); hs (D, B', Q', C);
        init_reference (B', Q', 2); inter_references (D, B', Q', 4); query_pos (B', Q', C) with
        (B', Q') = (B, Q) for images and (1, T*N_q) for a clip; and the flattening info of
        ``flatten_levels``.
        """
        flat = self.flatten_levels(srcs, masks, pos)
        layout = flat.pop("layout")
        b = flat["src"].shape[0]
        enc_frames = dec_frames = None
        padding_mask = flat["mask"]
        if self.num_frames:
            if b != self.num_frames:
                raise ValueError(f"DeformableTransformer: built for clips of {self.num_frames} frames, got a "
                                 f"batch of {b} frames")
            if query_embed.shape[0] % b:
                raise ValueError(f"DeformableTransformer: {query_embed.shape[0]} query rows is not a multiple "
                                 f"of {b} frames")
            enc_frames, dec_frames = self.temporal_frames(flat["src"].device)
            # DeVIS applies no padding mask inside its attention (a clip's frames are never padded).
            padding_mask = None
        memory = self.encoder(flat["src"], flat["pos"], flat["spatial_shapes"], flat["level_start_index"],
                              flat["valid_ratios"], padding_mask, enc_frames, layout)
        c = memory.shape[-1]
        query_pos, tgt = torch.split(query_embed, c, dim=1)
        if self.num_frames:
            query_pos, tgt = query_pos.reshape(b, -1, c), tgt.reshape(b, -1, c)
        else:
            query_pos = query_pos.unsqueeze(0).expand(b, -1, -1)
            tgt = tgt.unsqueeze(0).expand(b, -1, -1)
        init_reference = self.reference_points(query_pos).sigmoid()
        hs, inter_references = self.decoder(tgt, init_reference, memory, flat["spatial_shapes"],
                                            flat["level_start_index"], flat["valid_ratios"], query_pos,
                                            padding_mask, dec_frames)
        if self.num_frames:
            # One clip = one batch element with T*N_q frame-major queries (the official layout).
            d = hs.shape[0]
            hs = hs.reshape(d, 1, -1, c)
            inter_references = inter_references.reshape(d, 1, -1, inter_references.shape[-1])
            init_reference, query_pos = init_reference.reshape(1, -1, 2), query_pos.reshape(1, -1, c)
        memories, start = [], 0
        for s in srcs:
            h, w = s.shape[-2:]
            memories.append(memory[:, start:start + h * w].transpose(1, 2).reshape(b, c, h, w))
            start += h * w
        return dict(flat, memory=memory, memories=memories, hs=hs, init_reference=init_reference,
                    inter_references=inter_references, query_pos=query_pos)


def build_transformer(cfg) -> DeformableTransformer:
    """The deformable transformer from MODEL.* keys; for DATASETS.TYPE 'vis' the DeVIS video transformer
    (MODEL.DEVIS.NUM_FRAMES and MODEL.DEVIS.DEFORMABLE_ATTENTION.*)."""
    t = cfg.MODEL.TRANSFORMER
    video = {}
    if cfg.DATASETS.TYPE == "vis":
        da = cfg.MODEL.DEVIS.DEFORMABLE_ATTENTION
        if da.DISABLE_TEMPORAL_CONNECTIONS:
            raise ValueError("MODEL.DEVIS.DEFORMABLE_ATTENTION.DISABLE_TEMPORAL_CONNECTIONS=True (the "
                             "DeVISAblationTransformer) is not implemented; set it to False")
        video = dict(num_frames=cfg.MODEL.DEVIS.NUM_FRAMES, enc_temporal_points=da.ENC_N_POINTS_TEMPORAL_FRAME,
                     dec_temporal_points=da.DEC_N_POINTS_TEMPORAL_FRAME,
                     enc_temporal_window=0 if da.ENC_CONNECT_ALL_FRAMES else da.ENC_TEMPORAL_WINDOW,
                     instance_aware=da.INSTANCE_AWARE_ATTENTION)
    return DeformableTransformer(
        d_model=cfg.MODEL.HIDDEN_DIM, n_heads=t.N_HEADS, num_encoder_layers=t.ENCODER_LAYERS,
        num_decoder_layers=t.DECODER_LAYERS, dim_feedforward=cfg.MODEL.DIM_FEEDFORWARD,
        dropout=cfg.MODEL.DROPOUT, num_feature_levels=cfg.MODEL.NUM_FEATURE_LEVELS,
        enc_n_points=t.ENC_N_POINTS, dec_n_points=t.DEC_N_POINTS,
        bbx_gradient_prop=cfg.MODEL.BBX_GRADIENT_PROP, attention_backend=cfg.MODEL.ATTENTION_BACKEND,
        checkpoint_encoder_layers=cfg.MODEL.TRANSFORMER.CHECKPOINT_ENCODER_LAYERS, **video)
