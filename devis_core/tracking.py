"""Near-online video inference: clip partition and the multi-cue clip tracker (spec §7.1, §7.4).

The tracker takes the per-clip results of the model (dicts of tensors, spec §7.3) one clip at a time and
stitches them into video tracks; it knows nothing about the network. Masks stay soft probability maps
only on the frames that can still take part in stitching (the overlap windows); every other frame is
RLE-encoded as soon as its content is final, so memory stays bounded on long videos.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

# The official soft IoU clamps the union with this constant before dividing.
UNION_EPS = 1e-6
# Pixel elements per block when the soft IoU multiplies mask stacks: bounds the temporary copies.
_IOU_BLOCK_ELEMS = 1 << 22

SCORE_POLICIES = ("mean", "median")
CLASS_POLICIES = ("most_common", "score_weighting")
CLIP_RESULT_KEYS = ("scores", "labels", "boxes", "center_points", "masks", "inverse_idxs")


# --------------------------------------------------------------------------------------------------
# Clip partition
# --------------------------------------------------------------------------------------------------

def partition_clips(video_length: int, num_frames: int, stride: int) -> tuple[list[list[int]], int]:
    """Split a video into the clips the model sees (spec §7.1).

    Returns ``(clips, last_real_idx)``: ``clips`` is a list of frame-index lists of length
    ``num_frames`` each; ``last_real_idx`` is the position inside the last clip of the first frame the
    regular stride would have used (0 when there is a single clip).

    Videos shorter than ``num_frames`` give one clip padded ping-pong style (0..L-1, then backwards
    and forwards again without repeating the turning frame); only its first ``video_length`` outputs are
    real. Longer videos get clips starting at 0, s, 2s, ... while the clip ends strictly before the
    video end, then one last clip aligned to the video end.
    """
    for name, value in (("video_length", video_length), ("num_frames", num_frames), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"partition_clips: {name} must be an int, got {type(value).__name__}")
    if video_length < 1:
        raise ValueError(f"partition_clips: video_length must be >= 1, got {video_length}")
    if num_frames < 1:
        raise ValueError(f"partition_clips: num_frames must be >= 1, got {num_frames}")
    if not 1 <= stride < num_frames:
        raise ValueError(f"partition_clips: TEST.CLIP_TRACKING.STRIDE must be in [1, NUM_FRAMES={num_frames}), "
                         f"got {stride}")
    if video_length < num_frames:
        frames = list(range(video_length))
        forward = list(range(video_length))
        backwards = True
        while len(frames) < num_frames:
            if video_length == 1:
                # The official loop never terminates here (nothing left after dropping the turning frame).
                frames.append(0)
                continue
            frames.extend(forward[::-1][1:] if backwards else forward[1:])
            backwards = not backwards
        return [frames[:num_frames]], 0
    clips = []
    start = 0
    while start + num_frames < video_length:
        clips.append(list(range(start, start + num_frames)))
        start += stride
    last_start = video_length - num_frames
    clips.append(list(range(last_start, video_length)))
    return clips, start - last_start


# --------------------------------------------------------------------------------------------------
# Mask helpers and matching costs (pure functions)
# --------------------------------------------------------------------------------------------------

def upsample_mask_probs(mask_logits: Tensor, size: Sequence[int]) -> Tensor:
    """Mask logits at /4 resolution -> probabilities at the original frame size.

    mask_logits: (N, h, w). size: (H0, W0). Returns (N, H0, W0) sigmoid of the bilinear
    (align_corners=False) upsampling, same dtype and device.
    """
    if mask_logits.dim() != 3:
        raise ValueError(f"upsample_mask_probs: expected mask logits (N, h, w), got shape {tuple(mask_logits.shape)}")
    up = F.interpolate(mask_logits[:, None], size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    return up[:, 0].sigmoid()


def encode_mask(prob: Tensor) -> dict:
    """Binarise a probability map at > 0.5 and RLE-encode it.

    prob: (H, W) probabilities. Returns ``{"size": [H, W], "counts": str}`` (pycocotools, Fortran order).
    """
    return encode_masks(prob[None])[0]


def encode_masks(probs: Tensor | Sequence[Tensor]) -> list[dict]:
    """:func:`encode_mask` of N maps with ONE device-to-host transfer (each transfer waits for the device).

    probs: (N, H, W) probabilities, or a sequence of N (H, W) maps on one device, each probabilities or
    already binarised (bool). Returns N RLE dicts, identical to ``pycocotools.mask.encode`` of the
    binarised maps.

    The run boundaries are found where the masks live (on a GPU, in parallel) and only they cross to the
    host: a few hundred integers per mask instead of H*W bytes, which the host would then have to scan.
    """
    if isinstance(probs, Tensor):
        binary = probs > 0.5
    elif not probs:
        return []
    else:
        binary = torch.stack([p if p.dtype == torch.bool else p > 0.5 for p in probs])
    n, h, w = binary.shape
    if n == 0:
        return []
    # COCO RLE runs go down the columns (Fortran order)
    flat = binary.transpose(1, 2).reshape(n, h * w)
    which, where = torch.nonzero(flat[:, 1:] != flat[:, :-1], as_tuple=True)
    host = torch.cat([which, where, flat[:, 0].long()]).cpu().numpy()
    k = which.shape[0]
    which, run_starts, starts_on = host[:k], host[k:2 * k] + 1, host[2 * k:]
    bounds = np.searchsorted(which, np.arange(n + 1))
    uncompressed = []
    for i in range(n):
        edges = np.concatenate(([0], run_starts[bounds[i]:bounds[i + 1]], [h * w]))
        counts = np.diff(edges)
        if starts_on[i]:
            counts = np.concatenate(([0], counts))          # COCO RLE always opens with a run of zeros
        uncompressed.append({"size": [h, w], "counts": counts})
    rles = mask_util.frPyObjects(uncompressed, h, w)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("utf-8")
    return list(rles)


def soft_mask_iou(windows_a: Sequence[Sequence[Tensor]], windows_b: Sequence[Sequence[Tensor]],
                  frame_average: bool = False) -> np.ndarray:
    """Soft IoU between windows of probability maps.

    windows_a: A windows of F maps (H, W); windows_b: B windows of F maps (H, W), all on one device.
    Volumetric (default): IoU(a, b) = Σ_{f,pixels} m_a·m_b / max(Σ (m_a + m_b − m_a·m_b), 1e-6).
    ``frame_average``: the same ratio per frame, averaged over the F frames.
    Returns (A, B) float64.
    """
    if not windows_a or not windows_b:
        return np.zeros((len(windows_a), len(windows_b)))
    num_f = len(windows_a[0])
    if any(len(w) != num_f for w in list(windows_a) + list(windows_b)):
        raise ValueError("soft_mask_iou: every window must hold the same number of frames")
    # Accumulated where the maps live and read back once at the end (a read per block waits each time).
    device = windows_a[0][0].device
    inter = torch.zeros(num_f, len(windows_a), len(windows_b), dtype=torch.float64, device=device)
    sum_a = torch.zeros(num_f, len(windows_a), 1, dtype=torch.float64, device=device)
    sum_b = torch.zeros(num_f, 1, len(windows_b), dtype=torch.float64, device=device)
    for f in range(num_f):
        flat_a = [w[f].reshape(-1) for w in windows_a]
        flat_b = [w[f].reshape(-1) for w in windows_b]
        pixels = flat_a[0].numel()
        block = max(1, _IOU_BLOCK_ELEMS // max(len(flat_a), len(flat_b)))
        for p0 in range(0, pixels, block):
            a = torch.stack([m[p0:p0 + block] for m in flat_a]).to(torch.float64)
            b = torch.stack([m[p0:p0 + block] for m in flat_b]).to(torch.float64)
            inter[f] += a @ b.T
            sum_a[f] += a.sum(1, keepdim=True)
            sum_b[f] += b.sum(1)[None]
    host = torch.cat([inter.flatten(), sum_a.flatten(), sum_b.flatten()]).cpu()
    inter, sum_a, sum_b = (t.view_as(ref) for t, ref in zip(
        torch.split(host, [inter.numel(), sum_a.numel(), sum_b.numel()]), (inter, sum_a, sum_b)))
    if frame_average:
        union = (sum_a + sum_b - inter).clamp(min=UNION_EPS)
        return (inter / union).mean(0).numpy()
    inter, union = inter.sum(0), (sum_a + sum_b - inter).sum(0).clamp(min=UNION_EPS)
    return (inter / union).numpy()


def binary_mask_iou(windows_a: Sequence[Sequence[dict | None]], windows_b: Sequence[Sequence[dict | None]],
                    frame_average: bool = False) -> np.ndarray:
    """IoU between windows of RLE masks (None = empty frame).

    Volumetric (default): Σ_f |a∩b| / Σ_f |a∪b|; ``frame_average``: per-frame |a∩b| / |a∪b| averaged.
    A zero union gives IoU 0. Returns (A, B) float64.
    """
    out = np.zeros((len(windows_a), len(windows_b)))
    for i, wa in enumerate(windows_a):
        for j, wb in enumerate(windows_b):
            inters, unions = [], []
            for ra, rb in zip(wa, wb):
                if ra is not None and rb is not None:
                    inters.append(float(mask_util.area(mask_util.merge([ra, rb], intersect=True))))
                    unions.append(float(mask_util.area(mask_util.merge([ra, rb], intersect=False))))
                else:
                    inters.append(0.0)
                    unions.append(float(mask_util.area(ra if ra is not None else rb)) if (ra or rb) else 0.0)
            if frame_average:
                out[i, j] = np.mean([x / u if u > 0 else 0.0 for x, u in zip(inters, unions)])
            else:
                out[i, j] = sum(inters) / sum(unions) if sum(unions) > 0 else 0.0
    return out


def _per_frame_mean_float32(per_frame: np.ndarray) -> np.ndarray:
    # The official costs store each frame's matrix in float32 and average in float32; we keep that
    # rounding so Hungarian decisions match the official run bit for bit.
    per_frame = per_frame.astype(np.float32)
    return per_frame.mean(axis=0, dtype=np.float32)


def class_agreement(categories_a: np.ndarray, categories_b: np.ndarray) -> np.ndarray:
    """Fraction of overlap frames on which two tracks have the same category.

    categories_a: (A, F) int category ids; categories_b: (B, F). Returns (A, B) float32 in [0, 1].
    """
    ca, cb = np.asarray(categories_a), np.asarray(categories_b)
    equal = ca.T[:, :, None] == cb.T[:, None, :]                   # (F, A, B)
    return _per_frame_mean_float32(equal)


def score_distance(scores_a: np.ndarray, scores_b: np.ndarray) -> np.ndarray:
    """Mean absolute per-frame score difference over the overlap frames.

    scores_a: (A, F) per-frame scores; scores_b: (B, F). Returns (A, B) float32.
    """
    sa, sb = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    return _per_frame_mean_float32(np.abs(sa.T[:, :, None] - sb.T[:, None, :]))


def centre_distance(centres_a: np.ndarray, centres_b: np.ndarray) -> np.ndarray:
    """Mean over the overlap frames of the mean |Δx|, |Δy| between box centres.

    centres_a: (A, F, 2) normalised (cx, cy); centres_b: (B, F, 2). Returns (A, B) float32.
    """
    ca, cb = np.asarray(centres_a, dtype=np.float64), np.asarray(centres_b, dtype=np.float64)
    diff = np.abs(ca.transpose(1, 0, 2)[:, :, None] - cb.transpose(1, 0, 2)[:, None, :])  # (F, A, B, 2)
    return _per_frame_mean_float32(diff.mean(-1))


def stitching_cost(iou: np.ndarray, same_class: np.ndarray | None, score_diff: np.ndarray | None,
                   centre_diff: np.ndarray | None, mask_cost: float, class_cost: float, score_cost: float,
                   center_cost: float) -> np.ndarray:
    """Multi-cue cost −MASK·IoU − CLASS·cls + SCORE·sc + CENTER·ctr (terms with weight 0 skipped).

    All inputs (A, B); returns (A, B) float64. Each weighted cue is rounded to its own dtype (float32 for
    the class/score/centre cues) before it is added, as in the official matcher.
    """
    cost = -1 * np.asarray(iou, dtype=np.float64) * mask_cost
    for weight, cue, sign in ((class_cost, same_class, -1), (score_cost, score_diff, 1), (center_cost, centre_diff, 1)):
        if weight:
            cost = cost + (sign * cue * np.float32(weight)).astype(cue.dtype)
    return cost


def final_score(scores: np.ndarray, policy: str) -> float:
    """Track score from its valid-frame scores (F,): 'mean' or 'median'; 0 when there are none."""
    if policy not in SCORE_POLICIES:
        raise ValueError(f"FINAL_SCORE_POLICY must be one of {SCORE_POLICIES}, got {policy!r}")
    if len(scores) == 0:
        return 0.0
    return float(np.mean(scores) if policy == "mean" else np.median(scores))


def final_category(categories: np.ndarray, scores: np.ndarray, policy: str) -> int:
    """Track category from its valid frames. categories: (F,) ids; scores: (F,).

    'most_common': most frequent id (ties -> smaller id); 'score_weighting': id with the largest score
    sum (ties -> the id seen first).
    """
    if policy not in CLASS_POLICIES:
        raise ValueError(f"FINAL_CLASS_POLICY must be one of {CLASS_POLICIES}, got {policy!r}")
    categories = np.asarray(categories, dtype=np.int64)
    if len(categories) == 0:
        raise ValueError("final_category: the track has no valid frame")
    if policy == "most_common":
        return int(np.argmax(np.bincount(categories)))
    totals: dict[int, float] = {}
    for cat, score in zip(categories.tolist(), np.asarray(scores, dtype=np.float64).tolist()):
        totals[cat] = totals.get(cat, 0.0) + score
    return max(totals, key=lambda c: (totals[c], -list(totals).index(c)))


# --------------------------------------------------------------------------------------------------
# Tracker
# --------------------------------------------------------------------------------------------------

@dataclass
class _Track:
    """One video track: per-frame attributes over the whole video (NaN / -1 / None = no detection)."""
    scores: np.ndarray
    categories: np.ndarray
    boxes: np.ndarray
    centres: np.ndarray
    masks: list
    sources: list       # (clip index, mask id) per frame: identifies the mask content for the IoU cache
    valid: np.ndarray

    @classmethod
    def empty(cls, length: int) -> "_Track":
        return cls(np.full(length, np.nan), np.full(length, -1, dtype=np.int64), np.full((length, 4), np.nan),
                   np.full((length, 2), np.nan), [None] * length, [None] * length, np.ones(length, dtype=bool))


@dataclass
class _Clip:
    """One clip's detections, frame-major: K clip tracks over the clip's n real frames."""
    scores: np.ndarray          # (n, K)
    categories: np.ndarray      # (n, K)
    boxes: np.ndarray           # (n, K, 4)
    centres: np.ndarray         # (n, K, 2)
    mask_ids: list[int]         # (K,)
    masks: dict = field(default_factory=dict)   # mask id -> list of n (soft map or RLE)
    index: int = 0

    def write(self, track: _Track, clip_frames: Sequence[int], video_frames: Sequence[int], k: int) -> None:
        for t, v in zip(clip_frames, video_frames):
            track.scores[v] = self.scores[t, k]
            track.categories[v] = self.categories[t, k]
            track.boxes[v] = self.boxes[t, k]
            track.centres[v] = self.centres[t, k]
            track.masks[v] = self.masks[self.mask_ids[k]][t]
            track.sources[v] = (self.index, self.mask_ids[k])


class ClipTracker:
    """Stitch per-clip results of one video into video tracks (spec §7.4).

    Feed clips in order with :meth:`add_clip`, then call :meth:`finish` for the YouTube-VIS entries.

    video_id / video_length: the video's id in the annotation file and its frame count L.
    original_size: (H0, W0), the size masks are upsampled to and encoded at.
    num_frames / stride: clip length T and TEST.CLIP_TRACKING.STRIDE; the overlap is o = T − stride.
    num_out: detections per clip (TEST.NUM_OUT); without per-class matching it is the number of tracks.
    mask_cost, class_cost, score_cost, center_cost: weights of the stitching cues (0 drops a cue).
    min_frame_score: frames scoring below it become invalid (0 = off); min_detections: valid frames a
    track needs; min_track_score: final score a track must exceed (0 = off).
    final_score_policy: 'mean' | 'median'; final_class_policy: 'most_common' | 'score_weighting'.
    per_class_matching: match only within a category, killing / starting tracks (official, unused).
    use_binary_mask_iou: IoU of thresholded RLE masks instead of soft probabilities (every frame is
    encoded at once); use_frame_average_iou: average per-frame IoUs instead of the volumetric IoU.
    """

    def __init__(self, video_id: int, video_length: int, original_size: Sequence[int], num_frames: int, stride: int,
                 num_out: int = 100, mask_cost: float = 1.0, class_cost: float = 1.0, score_cost: float = 1.0,
                 center_cost: float = 0.0, min_frame_score: float = 0.001, min_track_score: float = 0.002,
                 min_detections: int = 1, final_score_policy: str = "mean", final_class_policy: str = "most_common",
                 per_class_matching: bool = False, use_binary_mask_iou: bool = False,
                 use_frame_average_iou: bool = False):
        partition_clips(video_length, num_frames, stride)      # validates the three sizes
        if len(original_size) != 2 or min(int(s) for s in original_size) < 1:
            raise ValueError(f"ClipTracker: original_size must be (H0, W0) > 0, got {tuple(original_size)}")
        if num_out < 1:
            raise ValueError(f"ClipTracker: TEST.NUM_OUT must be >= 1, got {num_out}")
        if min_detections < 1:
            raise ValueError(f"ClipTracker: TEST.CLIP_TRACKING.MIN_DETECTIONS must be >= 1 (a track without valid "
                             f"frames has no category), got {min_detections}")
        if final_score_policy not in SCORE_POLICIES:
            raise ValueError(f"ClipTracker: FINAL_SCORE_POLICY must be one of {SCORE_POLICIES}, got {final_score_policy!r}")
        if final_class_policy not in CLASS_POLICIES:
            raise ValueError(f"ClipTracker: FINAL_CLASS_POLICY must be one of {CLASS_POLICIES}, got {final_class_policy!r}")
        self.video_id = int(video_id)
        self.video_length = int(video_length)
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.num_frames, self.stride = int(num_frames), int(stride)
        self.overlap = self.num_frames - self.stride
        self.clip_length = min(self.num_frames, self.video_length)
        self.num_out = int(num_out)
        self.costs = dict(mask_cost=mask_cost, class_cost=class_cost, score_cost=score_cost, center_cost=center_cost)
        self.min_frame_score, self.min_track_score = min_frame_score, min_track_score
        self.min_detections = int(min_detections)
        self.final_score_policy, self.final_class_policy = final_score_policy, final_class_policy
        self.per_class_matching = bool(per_class_matching)
        self.use_binary_mask_iou, self.use_frame_average_iou = bool(use_binary_mask_iou), bool(use_frame_average_iou)
        self.tracks: list[_Track] = []
        self.track_of_category: dict[int, list[int]] = {}   # per-class matching: category -> live track indices
        self.last_t = 0            # video frames [0, last_t) hold stitched content
        self.num_clips = 0
        self.finished = False

    # ---------------------------------------------------------------------------------------- input
    def _read_clip(self, clip_result: Mapping[str, Any], clip_length: int) -> tuple[_Clip, Tensor]:
        where = f"video {self.video_id} clip {self.num_clips}"
        missing = [k for k in CLIP_RESULT_KEYS if k not in clip_result]
        if missing:
            raise KeyError(f"{where}: clip result lacks {missing} (expected keys {list(CLIP_RESULT_KEYS)})")
        scores = clip_result["scores"]
        if scores.dim() != 2 or scores.shape[0] < clip_length:
            raise ValueError(f"{where}: 'scores' must be (T >= clip_length={clip_length}, K), got {tuple(scores.shape)}")
        num_k = scores.shape[1]
        if not self.per_class_matching and num_k != self.num_out:
            raise ValueError(f"{where}: 'scores' has {num_k} detections, expected TEST.NUM_OUT={self.num_out}")
        expect = {"labels": (num_k,), "boxes": (num_k, 4), "center_points": (num_k, 2)}
        for key, tail in expect.items():
            shape = tuple(clip_result[key].shape)
            if len(shape) != 1 + len(tail) or shape[1:] != tail or shape[0] < clip_length:
                raise ValueError(f"{where}: '{key}' must be (T, {', '.join(map(str, tail))}), got {shape}")
        masks, inverse = clip_result["masks"], clip_result["inverse_idxs"]
        if tuple(inverse.shape) != (num_k,):
            raise ValueError(f"{where}: 'inverse_idxs' must be ({num_k},), got {tuple(inverse.shape)}")
        # One transfer for all per-detection values: float64 holds the float32 scores / boxes and the
        # integer labels / indices exactly.
        parts = [scores, clip_result["labels"], clip_result["boxes"], clip_result["center_points"]]
        parts = [p[:clip_length].detach() for p in parts] + [inverse.detach()]
        host = torch.cat([p.to(scores.device, torch.float64).reshape(-1) for p in parts]).cpu().numpy()
        sc, lab, box, cen, inv = np.split(host, np.cumsum([p.numel() for p in parts])[:-1])
        if masks.dim() != 4 or masks.shape[0] < clip_length or (num_k and int(inv.max()) >= masks.shape[1]):
            raise ValueError(f"{where}: 'masks' must be (T, U, h, w) with U > max(inverse_idxs), "
                             f"got {tuple(masks.shape)}")
        clip = _Clip(sc.reshape(clip_length, num_k), lab.astype(np.int64).reshape(clip_length, num_k),
                     box.reshape(clip_length, num_k, 4), cen.reshape(clip_length, num_k, 2),
                     [int(i) for i in inv], index=self.num_clips)
        return clip, masks[:clip_length].detach()

    def _process_masks(self, clip: _Clip, masks: Tensor, skip: int, last: bool) -> None:
        """Upsample each used mask and encode the frames that can no longer take part in stitching."""
        n, o = self.clip_length, self.overlap
        soft = set()
        if not self.use_binary_mask_iou:
            if self.num_clips > 0:
                soft.update(range(skip, skip + o))
            if not last:
                soft.update(range(n - o, n))
        to_encode: list[tuple[int, int, Tensor]] = []
        for mask_id in sorted(set(clip.mask_ids)):
            probs = upsample_mask_probs(masks[:, mask_id], self.original_size)
            # Clone kept frames so the other frames of this stack can be freed.
            clip.masks[mask_id] = [probs[t].clone() if t in soft else None for t in range(n)]
            to_encode += [(mask_id, t, probs[t] > 0.5) for t in range(n) if t not in soft]
        # Every final frame of every mask binarised, then read back and encoded together.
        for (mask_id, t, _), rle in zip(to_encode, encode_masks([b for _, _, b in to_encode])):
            clip.masks[mask_id][t] = rle

    # ------------------------------------------------------------------------------------- stitching
    def _match(self, track_ids: Sequence[int], clip: _Clip, clip_ks: Sequence[int], skip: int) -> list[tuple[int, int]]:
        """Hungarian assignment between video tracks and clip tracks; returns (track index, k) pairs."""
        if not track_ids or not clip_ks:
            return []
        o = self.overlap
        vw = slice(self.last_t - o, self.last_t)
        cw = slice(skip, skip + o)
        tracks = [self.tracks[i] for i in track_ids]
        for tr in tracks:
            if np.isnan(tr.scores[vw]).any() or any(m is None for m in tr.masks[vw]):
                raise RuntimeError(f"video {self.video_id}: a live track has no detection in the overlap window")
        # Windows with the same mask content share one IoU computation.
        va_keys = [tuple(tr.sources[vw]) for tr in tracks]
        cb_keys = [clip.mask_ids[k] for k in clip_ks]
        ua, ub = list(dict.fromkeys(va_keys)), list(dict.fromkeys(cb_keys))
        wa = [self.tracks[track_ids[va_keys.index(key)]].masks[vw] for key in ua]
        wb = [clip.masks[mid][cw] for mid in ub]
        iou_fn = binary_mask_iou if self.use_binary_mask_iou else soft_mask_iou
        iou_u = iou_fn(wa, wb, frame_average=self.use_frame_average_iou)
        iou = iou_u[np.ix_([ua.index(k) for k in va_keys], [ub.index(k) for k in cb_keys])]
        c = self.costs
        same = class_agreement(np.stack([tr.categories[vw] for tr in tracks]), clip.categories[cw][:, clip_ks].T) \
            if c["class_cost"] else None
        sdiff = score_distance(np.stack([tr.scores[vw] for tr in tracks]), clip.scores[cw][:, clip_ks].T) \
            if c["score_cost"] else None
        cdiff = centre_distance(np.stack([tr.centres[vw] for tr in tracks]), clip.centres[cw][:, clip_ks].transpose(1, 0, 2)) \
            if c["center_cost"] else None
        cost = stitching_cost(iou, same, sdiff, cdiff, **c)
        rows, cols = linear_sum_assignment(cost)
        return [(track_ids[r], clip_ks[k]) for r, k in zip(rows.tolist(), cols.tolist())]

    def _append(self, track: _Track, clip: _Clip, k: int, skip: int) -> None:
        """Continue ``track`` with clip track k: higher score wins on the overlap, then the new frames."""
        n, o = self.clip_length, self.overlap
        first = self.last_t - o - skip
        for t in range(skip + o):
            stored = track.scores[first + t]
            if clip.scores[t, k] > (0.0 if np.isnan(stored) else stored):
                clip.write(track, [t], [first + t], k)
        clip.write(track, range(skip + o, n), range(self.last_t, self.last_t + n - skip - o), k)

    def _new_track(self, clip: _Clip, k: int, skip: int) -> int:
        track = _Track.empty(self.video_length)
        first = 0 if self.num_clips == 0 else self.last_t - self.overlap - skip
        track.valid[:first] = False
        clip.write(track, range(self.clip_length), range(first, first + self.clip_length), k)
        self.tracks.append(track)
        self.track_of_category.setdefault(int(clip.categories[0, k]), []).append(len(self.tracks) - 1)
        return len(self.tracks) - 1

    def _kill(self, index: int) -> None:
        self.tracks[index].valid[self.last_t:] = False

    def _advance(self) -> None:
        """Encode the frames that are now final and move the cursor by clip_length − o."""
        step = self.clip_length - self.overlap
        frames = range(max(self.last_t - self.overlap, 0), min(self.last_t - self.overlap + step, self.video_length))
        _encode_frames(self.tracks, frames)
        self.last_t += step

    def add_clip(self, clip_result: Mapping[str, Tensor], start_idx: int, clip_length: int | None = None) -> None:
        """Stitch one clip into the video tracks.

        clip_result: the per-clip result of spec §7.3 — ``scores`` (T, K), ``labels`` (T, K) category ids,
        ``boxes`` (T, K, 4) xyxy pixels, ``center_points`` (T, K, 2) normalised, ``masks`` (T, U, h, w)
        logits, ``inverse_idxs`` (K,) mask index of each detection. start_idx: the video frame index of the
        clip's first frame (``clips[i][0]`` of :func:`partition_clips`). clip_length: real frames in the
        clip (default min(NUM_FRAMES, video length)).
        """
        if self.finished:
            raise RuntimeError(f"video {self.video_id}: add_clip after finish()")
        if clip_length is not None and int(clip_length) != self.clip_length:
            raise ValueError(f"video {self.video_id}: clip_length {clip_length} != min(NUM_FRAMES, video length) "
                             f"= {self.clip_length}")
        n, o = self.clip_length, self.overlap
        if self.num_clips == 0:
            if start_idx != 0:
                raise ValueError(f"video {self.video_id}: the first clip must start at frame 0, got {start_idx}")
            skip = 0
        else:
            skip = self.last_t - o - int(start_idx)
            if skip < 0 or skip + o > n or start_idx + n > self.video_length or self.last_t >= self.video_length:
                raise ValueError(f"video {self.video_id} clip {self.num_clips}: start frame {start_idx} does not "
                                 f"continue the tracks (stitched frames [0, {self.last_t}), overlap {o}, "
                                 f"video length {self.video_length})")
        last = int(start_idx) + n >= self.video_length
        clip, masks = self._read_clip(clip_result, n)
        self._process_masks(clip, masks, skip, last)
        num_k = clip.scores.shape[1]

        if self.num_clips == 0:
            for k in range(num_k):
                self._new_track(clip, k, skip)
            self.last_t = n
        elif not self.per_class_matching:
            for index, k in self._match(list(range(len(self.tracks))), clip, list(range(num_k)), skip):
                self._append(self.tracks[index], clip, k, skip)
            self._advance()
        else:
            self._stitch_per_class(clip, skip)
            self._advance()
        self.num_clips += 1

    def _stitch_per_class(self, clip: _Clip, skip: int) -> None:
        clip_of_category: dict[int, list[int]] = {}
        for k in range(clip.scores.shape[1]):
            clip_of_category.setdefault(int(clip.categories[0, k]), []).append(k)
        # Sorted for a reproducible track order (the official code iterates a Python set here).
        for cat in sorted(set(self.track_of_category) | set(clip_of_category)):
            video_ids = list(self.track_of_category.get(cat, []))
            clip_ks = clip_of_category.get(cat, [])
            matches = self._match(video_ids, clip, clip_ks, skip)
            for index, k in matches:
                self._append(self.tracks[index], clip, k, skip)
            matched_v = {i for i, _ in matches}
            matched_k = {k for _, k in matches}
            for index in video_ids:
                if index not in matched_v:
                    self._kill(index)
                    self.track_of_category[cat].remove(index)
            if cat in self.track_of_category and not self.track_of_category[cat]:
                del self.track_of_category[cat]
            for k in clip_ks:
                if k not in matched_k:
                    self._new_track(clip, k, skip)

    # ------------------------------------------------------------------------------------------ output
    def finish(self, with_boxes: bool = False) -> list[dict]:
        """Apply the frame / detection / track thresholds and return YouTube-VIS result entries.

        Returns a list of ``{"video_id", "score", "category_id", "segmentations": [RLE | None per frame]}``
        in track order; ``with_boxes`` adds ``"boxes"``: per frame [x0, y0, x1, y1] pixels or None.
        """
        if self.num_clips == 0:
            raise RuntimeError(f"video {self.video_id}: finish() before any add_clip()")
        if self.last_t < self.video_length:
            raise RuntimeError(f"video {self.video_id}: frames [{self.last_t}, {self.video_length}) were never "
                               "covered by a clip")
        self.finished = True
        kept: list[tuple[_Track, float]] = []
        for track in self.tracks:
            has = ~np.isnan(track.scores)
            track.valid &= has & np.array([m is not None for m in track.masks])
            if self.min_frame_score != 0:
                track.valid &= ~(has & (np.nan_to_num(track.scores, nan=np.inf) < self.min_frame_score))
            if track.valid.sum() < self.min_detections:
                continue
            score = final_score(track.scores[track.valid], self.final_score_policy)
            if self.min_track_score != 0 and not score > self.min_track_score:
                continue
            kept.append((track, score))
        _encode_frames([track for track, _ in kept], range(self.video_length))
        entries = []
        for track, score in kept:
            entry = {"video_id": self.video_id, "score": score,
                     "category_id": final_category(track.categories[track.valid], track.scores[track.valid],
                                                   self.final_class_policy),
                     "segmentations": [m if v else None for m, v in zip(track.masks, track.valid)]}
            if with_boxes:
                entry["boxes"] = [b.tolist() if v else None for b, v in zip(track.boxes, track.valid)]
            entries.append(entry)
        for track in self.tracks:      # release the soft maps of dropped tracks
            track.masks = [m if isinstance(m, dict) else None for m in track.masks]
        return entries


def _encode_frames(tracks: Sequence[_Track], frames: Sequence[int]) -> None:
    """RLE-encode the soft masks of ``frames`` of every track (one transfer for all); a frame without a
    mask becomes invalid. Tracks sharing a trajectory's map (the same tensor object) encode it once."""
    todo: dict[int, Tensor] = {}
    for track in tracks:
        for f in frames:
            mask = track.masks[f]
            if mask is None:
                track.valid[f] = False
            elif not isinstance(mask, dict):
                todo.setdefault(id(mask), mask)
    rles = dict(zip(todo, encode_masks(list(todo.values()))))
    for track in tracks:
        for f in frames:
            mask = track.masks[f]
            if mask is not None and not isinstance(mask, dict):
                track.masks[f] = rles[id(mask)]


def build_tracker(cfg, video_id: int, video_length: int, original_size: Sequence[int]) -> ClipTracker:
    """A :class:`ClipTracker` for one video from ``TEST.CLIP_TRACKING.*``, ``TEST.NUM_OUT`` and
    ``MODEL.DEVIS.NUM_FRAMES``."""
    ct = cfg.TEST.CLIP_TRACKING
    return ClipTracker(video_id, video_length, original_size, num_frames=cfg.MODEL.DEVIS.NUM_FRAMES,
                       stride=ct.STRIDE, num_out=cfg.TEST.NUM_OUT, mask_cost=ct.MASK_COST, class_cost=ct.CLASS_COST,
                       score_cost=ct.SCORE_COST, center_cost=ct.CENTER_COST, min_frame_score=ct.MIN_FRAME_SCORE,
                       min_track_score=ct.MIN_TRACK_SCORE, min_detections=ct.MIN_DETECTIONS,
                       final_score_policy=ct.FINAL_SCORE_POLICY, final_class_policy=ct.FINAL_CLASS_POLICY,
                       per_class_matching=ct.PER_CLASS_MATCHING, use_binary_mask_iou=ct.USE_BINARY_MASK_IOU,
                       use_frame_average_iou=ct.USE_FRAME_AVERAGE_IOU)
