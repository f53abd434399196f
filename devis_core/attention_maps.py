"""Decoder attention maps of DeVIS: capture sampling points and weights, select them, draw them.

``decoder_attention`` runs one clip through the model while the chosen decoder cross-attention layers
record what they hand to the deformable-attention op (spec §3.5): for query (t, i) the points it samples
on its own frame and on every other frame (around the reference box of query (t', i) there: the
instance-aware reference), with the jointly soft-maxed weights. ``plot_attention_map`` draws one
query's points on the frames they sample, sized and coloured by weight, with the reference boxes.

Command: ``python -m devis_core.attention_maps --config-file F --weights W --input FRAMES_DIR --out DIR``
writes one PNG per (top track, query frame).
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor, nn

from devis_core.fileio import atomic_write_bytes
from devis_core.models.deformable_attention import MSDeformAttn
from devis_core.models.postprocess import clip_topk
from devis_core.tracking import upsample_mask_probs
from devis_core.visualize import color_for_id, figure_to_png, overlay_masks

__all__ = ["capture_attention", "decoder_attention", "decoder_attention_layers", "attention_points",
           "plot_attention_map", "load_frame_folder", "prepare_clip", "main"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


# --------------------------------------------------------------------------------------------------
# capture


@contextmanager
def capture_attention(modules: nn.Module | Iterable[nn.Module]) -> Iterator[list[MSDeformAttn]]:
    """Record the sampling locations and weights of every ``MSDeformAttn`` in ``modules`` while inside.

    modules: a model, a layer or an iterable of modules; every MSDeformAttn found below them records
    its last forward in ``.last_attention`` (see ``MSDeformAttn._record``). Yields those modules. On exit
    recording is switched off and the records are dropped, so read them inside the block.
    """
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    found = [m for root in roots for m in root.modules() if isinstance(m, MSDeformAttn)]
    if not found:
        raise ValueError("capture_attention: no MSDeformAttn module found in the given modules")
    for m in found:
        m.capture, m.last_attention = True, None
    try:
        yield found
    finally:
        for m in found:
            m.capture, m.last_attention = False, None


def _resolve_layers(layers: int | Sequence[int] | None, num_layers: int) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    chosen = [layers] if isinstance(layers, (int, np.integer)) else list(layers)
    out = []
    for layer in chosen:
        if not -num_layers <= int(layer) < num_layers:
            raise IndexError(f"decoder_attention: layer {layer} is outside the {num_layers} decoder layers "
                             f"(valid: {-num_layers}..{num_layers - 1})")
        out.append(int(layer) % num_layers)
    return out


@torch.no_grad()
def decoder_attention_layers(model, frames: Tensor, layers: int | Sequence[int] | None = None,
                             tgt_size: Sequence[int] | None = None,
                             clip_length: int | None = None) -> list[dict]:
    """Decoder cross-attention of one clip for several layers (one forward).

    model: a DeVIS model (run in eval mode, its mode restored afterwards). frames: (T, 3, h, w) normalised
    clip, T = MODEL.DEVIS.NUM_FRAMES. layers: decoder layer indices (negative count from the end; None:
    all). tgt_size: (H0, W0) for the top-k boxes (default (h, w)). clip_length: real frames (default T).

    Returns one dict per layer (N_q slots, M heads, L levels, W = T-1 slots of other frames), all
    coordinates normalised to [0, 1] with (0, 0) the top-left image corner:
      layer: int; spatial_shapes: (L, 2) int64 (H_l, W_l); frame_size: (h, w);
      locations (T, N_q, M, L, P_c, 2) x, y and weights (T, N_q, M, L, P_c) on the query's own frame;
      references (T, N_q, 2|4): the reference of (t, i) in this layer (a point at layer 0, a box
        cx, cy, w, h after);
      temporal_frames (T, W) int64: frame read by slot w of frame t; temporal_locations
        (T, N_q, M, W, L, P_t, 2), temporal_weights (T, N_q, M, W, L, P_t) and temporal_references
        (T, N_q, W, 2|4): the reference of (temporal_frames[t, w], i), around which (t, i) samples that
        frame (None for all four without a temporal decoder branch);
      pred_boxes (T, N_q, 4) final normalised boxes; topk: the per-clip top-k result of spec §7.3
        (scores (T', K), labels (T', K), boxes, center_points, top_k_idxs (K,) slot of each track,
        inverse_idxs (K,), masks (T', U, ceil(h/4), ceil(w/4)) logits).
    """
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"decoder_attention: frames must be (T, 3, h, w), got shape {tuple(frames.shape)}")
    t_len = model.num_frames
    if frames.shape[0] != t_len:
        raise ValueError(f"decoder_attention: the model reads clips of {t_len} frames (MODEL.DEVIS.NUM_FRAMES), "
                         f"got {frames.shape[0]}")
    decoder = model.def_detr.transformer.decoder
    chosen = _resolve_layers(layers, len(decoder.layers))
    clip_length = t_len if clip_length is None else int(clip_length)
    h, w = frames.shape[-2:]
    tgt_size = (h, w) if tgt_size is None else tuple(int(s) for s in tgt_size)
    frames = frames.to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with capture_attention([decoder.layers[i].cross_attn for i in chosen]):
            feats = model.def_detr.forward_features(frames)
            records = [decoder.layers[i].cross_attn.last_attention for i in chosen]
        out = model.def_detr.predict(feats)
        topk = clip_topk(out["pred_logits"][0], out["pred_boxes"][0], t_len, model.num_out, tgt_size, clip_length)
        masks = model.trajectory_masks(feats, torch.unique(topk["top_k_idxs"]))
        topk["masks"] = masks[:, :clip_length].transpose(0, 1)
    finally:
        model.train(was_training)
    n_q = model.num_slots
    result = []
    for layer, rec in zip(chosen, records):
        temporal = "temporal_locations" in rec
        result.append({
            "layer": layer,
            "spatial_shapes": feats["spatial_shapes"].cpu(),
            "frame_size": (int(h), int(w)),
            "locations": rec["locations"].cpu(),
            "weights": rec["weights"].cpu(),
            # The level copies differ only by valid ratios, which are 1 for unpadded clips.
            "references": rec["references"][:, :, 0].cpu(),
            "temporal_frames": rec["temporal_frames"].cpu() if temporal else None,
            "temporal_locations": rec["temporal_locations"].cpu() if temporal else None,
            "temporal_weights": rec["temporal_weights"].cpu() if temporal else None,
            "temporal_references": rec["temporal_references"][:, :, :, 0].cpu() if temporal else None,
            "pred_boxes": out["pred_boxes"][0].view(t_len, n_q, 4).cpu(),
            "topk": {k: v.cpu() for k, v in topk.items()},
        })
    return result


def decoder_attention(model, frames: Tensor, layer: int = -1, tgt_size: Sequence[int] | None = None,
                      clip_length: int | None = None) -> dict:
    """Decoder cross-attention of one clip for one layer; see ``decoder_attention_layers`` for the dict.

    frames: (T, 3, h, w) normalised clip. layer: decoder layer (default the last).
    """
    return decoder_attention_layers(model, frames, [layer], tgt_size, clip_length)[0]


# --------------------------------------------------------------------------------------------------
# selection


def _check_choice(value, count: int, name: str, everything: str) -> int | None:
    if value == everything:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= int(value) < count:
        raise ValueError(f"attention map: {name} must be {everything!r} or an int in 0..{count - 1}, got {value!r}")
    return int(value)


def track_slot(attn: dict, track: int) -> int:
    """Trajectory slot of top-k track ``track`` (an index into ``attn['topk']``)."""
    slots = attn["topk"]["top_k_idxs"]
    if not 0 <= int(track) < len(slots):
        raise IndexError(f"attention map: track {track} is outside the {len(slots)} top-k tracks of the clip")
    return int(slots[int(track)])


def attention_points(attn: dict, slot: int, frame: int, level: str | int = "merged",
                     head: str | int = "all") -> list[tuple[np.ndarray, np.ndarray]]:
    """Sampling points of query (frame, slot) grouped by the clip frame they sample.

    attn: a ``decoder_attention`` dict. level: 'merged' (all levels) or a level index; head: 'all' or a
    head index. Returns T entries, entry t' = (xy (N, 2) normalised x, y; weights (N,)) of the points on
    frame t' (the own-frame points on t' = frame, slot w's points on temporal_frames[frame, w]).
    Summed over all entries the weights give 1 per selected head when level is 'merged'.
    """
    locs, weights = attn["locations"], attn["weights"]
    t_len, n_q, n_heads, n_levels = weights.shape[:4]
    if not 0 <= int(frame) < t_len:
        raise IndexError(f"attention map: frame {frame} is outside the clip's {t_len} frames")
    if not 0 <= int(slot) < n_q:
        raise IndexError(f"attention map: slot {slot} is outside the {n_q} query slots")
    lvl = _check_choice(level, n_levels, "level", "merged")
    hd = _check_choice(head, n_heads, "head", "all")
    heads = slice(None) if hd is None else slice(hd, hd + 1)
    levels = slice(None) if lvl is None else slice(lvl, lvl + 1)
    per_frame: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(t_len)]
    # own frame: (M, L, P, 2)
    per_frame[frame].append((locs[frame, slot, heads, levels], weights[frame, slot, heads, levels]))
    if attn.get("temporal_locations") is not None:
        t_locs, t_w = attn["temporal_locations"][frame, slot], attn["temporal_weights"][frame, slot]
        for w, other in enumerate(attn["temporal_frames"][frame].tolist()):
            per_frame[other].append((t_locs[heads, w, levels], t_w[heads, w, levels]))
    out = []
    for parts in per_frame:
        xy = np.concatenate([p[0].reshape(-1, 2).double().numpy() for p in parts]) if parts else np.zeros((0, 2))
        wt = np.concatenate([p[1].reshape(-1).double().numpy() for p in parts]) if parts else np.zeros(0)
        out.append((xy, wt))
    return out


def reference_per_frame(attn: dict, slot: int, frame: int) -> list[np.ndarray]:
    """Reference (2,) point or (4,) box cx, cy, w, h of query (frame, slot) on each of the T clip frames:
    its own reference on ``frame`` and the instance-aware reference read on every other frame."""
    refs = [None] * attn["weights"].shape[0]
    refs[frame] = attn["references"][frame, slot].double().numpy()
    if attn.get("temporal_references") is not None:
        for w, other in enumerate(attn["temporal_frames"][frame].tolist()):
            refs[other] = attn["temporal_references"][frame, slot, w].double().numpy()
    return refs


# --------------------------------------------------------------------------------------------------
# drawing


def _check_frames(frames: Sequence[np.ndarray], t_len: int) -> list[np.ndarray]:
    frames = [np.asarray(f) for f in frames]
    if len(frames) != t_len:
        raise ValueError(f"attention map: expected the clip's {t_len} frames, got {len(frames)}")
    for t, f in enumerate(frames):
        if f.ndim != 3 or f.shape[2] != 3 or f.dtype != np.uint8:
            raise ValueError(f"attention map: frames[{t}] must be (H, W, 3) uint8 RGB, got shape {f.shape} "
                             f"dtype {f.dtype}")
    return frames


def _draw_reference(ax, ref: np.ndarray, height: int, width: int, rgb, dashed: bool) -> None:
    x, y = ref[0] * width - 0.5, ref[1] * height - 0.5
    if ref.shape[0] == 2:
        ax.plot([x], [y], marker="+", markersize=10, markeredgewidth=2, color=rgb)
        return
    bw, bh = ref[2] * width, ref[3] * height
    ax.add_patch(Rectangle((x - bw / 2, y - bh / 2), bw, bh, fill=False, edgecolor=rgb, linewidth=1.5,
                           linestyle="--" if dashed else "-"))


def plot_attention_map(frames: Sequence[np.ndarray], attn: dict, track: int | None = 0, frame: int = 0,
                       level: str | int = "merged", head: str | int = "all", *, slot: int | None = None,
                       category_names: dict[int, str] | None = None, panel_width: float = 2.8,
                       max_marker: float = 120.0) -> Figure:
    """Where one query of the clip looks: its sampling points on every frame, sized/coloured by weight.

    frames: the T clip frames (H, W, 3) uint8 RGB (any size: coordinates are normalised).
    attn: a ``decoder_attention`` dict. track: index into the clip's top-k tracks (its slot is used and
    its mask shown), or None with ``slot`` set to pick a query slot directly. frame: the query frame.
    level: 'merged' or a level index; head: 'all' or a head index.
    Returns a Figure with one panel per clip frame: the points there ('cividis', shared scale), the
    reference box of the query (solid on its own frame, dashed on the others: the instance-aware box of
    (t', slot)), the title giving the share of the selected attention weight that frame receives.
    """
    if track is None and slot is None:
        raise ValueError("plot_attention_map: give a track (top-k index) or a slot")
    if track is not None:
        slot = track_slot(attn, track)
    t_len = attn["weights"].shape[0]
    frames = _check_frames(frames, t_len)
    points = attention_points(attn, slot, frame, level, head)
    refs = reference_per_frame(attn, slot, frame)
    # Each head's weights sum to 1 over all frames and levels: a frame's share is relative to this.
    total = max(sum(float(wt.sum()) for _, wt in points), 1e-12)
    vmax = max((float(wt.max()) for _, wt in points if wt.size), default=1.0) or 1.0
    norm, cmap = Normalize(0.0, vmax), colormaps["cividis"]
    rgb = np.array(color_for_id(track if track is not None else slot)) / 255.0

    masks = None
    if track is not None:
        topk = attn["topk"]
        masks = topk["masks"][:, int(topk["inverse_idxs"][track])]        # (T', h/4, w/4) logits
    height0, width0 = frames[0].shape[:2]
    aspect = height0 / width0
    fig = Figure(figsize=(panel_width * t_len + 0.8, panel_width * aspect + 0.9), layout="constrained")
    axes = fig.subplots(1, t_len, squeeze=False)[0]
    for t, ax in enumerate(axes):
        image = frames[t]
        height, width = image.shape[:2]
        if masks is not None and t < masks.shape[0]:
            mask = upsample_mask_probs(masks[t:t + 1].float(), (height, width))[0].numpy() > 0.5
            image = overlay_masks(image, mask[None], np.array([color_for_id(track)]), alpha=0.35)
        ax.imshow(image, interpolation="nearest")
        xy, wt = points[t]
        if wt.size:
            order = np.argsort(wt)              # heaviest drawn last, on top
            ax.scatter(xy[order, 0] * width - 0.5, xy[order, 1] * height - 0.5,
                                 s=max_marker * wt[order] / vmax + 2.0, c=wt[order], cmap=cmap, norm=norm,
                                 edgecolors="white", linewidths=0.3)
        if refs[t] is not None:
            _draw_reference(ax, refs[t], height, width, rgb, dashed=t != frame)
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_axis_off()
        role = "query frame" if t == frame else "other frame"
        ax.set_title(f"t={t} ({role}): {100 * wt.sum() / total:.1f}%", fontsize=8)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), shrink=0.8, label="attention weight")
    what = f"slot {slot}"
    if track is not None:
        topk = attn["topk"]
        cat = int(topk["labels"][0, track])
        name = (category_names or {}).get(cat, f"class {cat}")
        score = float(topk["scores"][:, track].mean())
        what = f"track {track} (slot {slot}, {name} {score:.2f})"
    level_text = "levels merged" if level == "merged" else f"level {level}"
    head_text = "all heads" if head == "all" else f"head {head}"
    fig.suptitle(f"decoder layer {attn['layer']} · {what} · query frame {frame} · {level_text} · {head_text}",
                 fontsize=9)
    return fig


# --------------------------------------------------------------------------------------------------
# command


def load_frame_folder(folder: str, indices: Sequence[int] | None = None) -> tuple[list[np.ndarray], list[str]]:
    """Frames of a folder of images (sorted by name). indices: which ones (default all).

    Returns (frames (H, W, 3) uint8 RGB, their paths). Errors name the folder and the bad index or file.
    """
    from PIL import Image

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--input {folder}: not a folder of frames")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise FileNotFoundError(f"--input {folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    indices = list(range(len(names))) if indices is None else [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < len(names)]
    if bad:
        raise IndexError(f"--frames {bad}: {folder} has {len(names)} frames (indices 0..{len(names) - 1})")
    frames, paths = [], []
    for i in indices:
        path = os.path.join(folder, names[i])
        with Image.open(path) as img:
            frames.append(np.asarray(img.convert("RGB")))
        paths.append(path)
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        raise ValueError(f"--input {folder}: frames differ in size {sorted(sizes)}; a clip needs one size")
    return frames, paths


def prepare_clip(frames: Sequence[np.ndarray], min_size: int, max_size: float) -> Tensor:
    """Test-time pre-processing of spec §7.2: PIL bilinear resize (DETR size rule) and ImageNet
    normalisation. frames: (H, W, 3) uint8 RGB. Returns (T, 3, h, w) float32."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    from devis_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD, detr_resize_size

    size = detr_resize_size(frames[0].shape[:2], int(min_size), max_size)
    tensors = [F.pil_to_tensor(F.resize(Image.fromarray(f), list(size))) for f in frames]
    return F.normalize(torch.stack(tensors).float() / 255.0, list(IMAGENET_MEAN), list(IMAGENET_STD))


def _save_png_atomic(fig: Figure, path: str) -> None:
    atomic_write_bytes(path, figure_to_png(fig))


def _num_classes_of(weights: str) -> int:
    from devis_core.checkpoint import CheckpointError, extract_state_dict, read_checkpoint

    sd = extract_state_dict(read_checkpoint(weights, trusted=True), weights)
    for key, value in sd.items():
        if key.endswith("class_embed.0.weight"):
            return int(value.shape[0])
    raise CheckpointError(f"{weights}: no '*class_embed.0.weight' entry to read the class count from; pass "
                          "--num-classes")


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Command line: write decoder attention maps of one clip as PNGs. Returns the written paths."""
    from devis_core.config import load_config
    from devis_core.models import DeVIS, build_model
    from devis_core.tracking import partition_clips

    parser = argparse.ArgumentParser(prog="python -m devis_core.attention_maps", description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True, help="DeVIS YAML config")
    parser.add_argument("--weights", required=True, help="DeVIS checkpoint (local file)")
    parser.add_argument("--input", required=True, help="folder of frames (sorted by file name)")
    parser.add_argument("--out", required=True, help="output folder for the PNGs")
    parser.add_argument("--frames", type=int, nargs="+", default=None,
                        help="frame indices forming the clip (default: the first NUM_FRAMES); "
                        "give it before another option, not right before KEY VALUE overrides")
    parser.add_argument("--layer", type=int, default=-1, help="decoder layer (default: the last)")
    parser.add_argument("--num-tracks", type=int, default=3, help="top-k tracks of the clip to draw")
    parser.add_argument("--per-level", action="store_true", help="also one figure per feature level")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="class logits of the model (default: read from the checkpoint)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    args = parser.parse_args(argv)

    cfg = load_config(args.config_file, list(args.opts) + ["MODEL.WEIGHTS", args.weights,
                                                           "MODEL.BACKBONE_WEIGHTS", "", "DEVICE", "cpu"])
    if cfg.DATASETS.TYPE != "vis":
        raise ValueError(f"{args.config_file}: DATASETS.TYPE is {cfg.DATASETS.TYPE!r}; attention maps need a "
                         "DeVIS ('vis') config")
    t_len = cfg.MODEL.DEVIS.NUM_FRAMES
    frames, _ = load_frame_folder(args.input, args.frames)
    if len(frames) > t_len:
        if args.frames is not None:
            raise ValueError(f"--frames: {len(frames)} indices given, the model reads clips of {t_len} frames")
        frames = frames[:t_len]
    clip_length = len(frames)
    if clip_length < t_len:
        # A short clip is padded back and forth as in the test partition (spec §7.1).
        order = partition_clips(clip_length, t_len, 1)[0][0]
        frames = [frames[i] for i in order]
    num_classes = args.num_classes if args.num_classes is not None else _num_classes_of(args.weights)
    model = build_model(cfg, num_classes, load_weights=True)
    if not isinstance(model, DeVIS):
        raise TypeError(f"{args.config_file}: built a {type(model).__name__}, expected DeVIS")
    clip = prepare_clip(frames, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    attn = decoder_attention(model, clip, args.layer, tgt_size=frames[0].shape[:2], clip_length=clip_length)
    os.makedirs(args.out, exist_ok=True)
    written = []
    num_tracks = min(args.num_tracks, len(attn["topk"]["top_k_idxs"]))
    levels = ["merged"] + (list(range(attn["weights"].shape[3])) if args.per_level else [])
    for k in range(num_tracks):
        for t in range(clip_length):
            for level in levels:
                fig = plot_attention_map(frames, attn, track=k, frame=t, level=level)
                suffix = "" if level == "merged" else f"_level{level}"
                path = os.path.join(args.out, f"layer{attn['layer']}_track{k}_frame{t}{suffix}.png")
                _save_png_atomic(fig, path)
                written.append(path)
    print(f"wrote {len(written)} attention maps to {args.out}")
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
