"""Video instance segmentation datasets (YouTube-VIS 2019/2021, OVIS, synthetic): training clips, test videos.

Training (:class:`VISTrainDataset`) follows the official sampling of spec §6.2: one sample per (video,
start frame), T consecutive frames, short videos padded by bouncing back and forth. Test
(:class:`VISTestDataset`) yields whole videos resized by the §7.2 rule; cutting them into clips is the
tracker's job (``devis_core.tracking.partition_clips``). Frames are decoded and augmented in DataLoader
workers (``build_vis_loader``, NUM_WORKERS); all pixel work is tensor ops on the whole clip.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from ..interrupt import ignore_sigterm_in_worker
from ..models.nested import NestedTensor, nested_tensor_from_tensor_list, pad_batch_to_multiple
from .registry import resolve_dataset
from .transforms import IMAGENET_MEAN, IMAGENET_STD, detr_resize_size
from .vis_transforms import make_train_clip_transforms
from .ytvis_format import DatasetError, VideoIndex, decode_segmentation, load_ytvis, mask_to_box

__all__ = ["clip_frame_indices", "clip_starts", "VISTrainDataset", "VISTestDataset", "collate_clips",
           "collate_videos", "build_vis_train_dataset", "build_vis_test_dataset", "build_vis_loader"]


def clip_frame_indices(length: int, start: int, num_frames: int) -> list[int]:
    """Frame indices of the training clip that starts at ``start`` in a video of ``length`` frames.

    start, start+1, ..., length−2, then back and forth over the whole video (length−1, ..., 1, 0, 1, ...,
    length−2, length−1, ...) until ``num_frames`` indices: consecutive frames whenever start + T ≤ length,
    the official bounce otherwise (short videos, and late starts with SAMPLE_EACH_FRAME). A one-frame
    video repeats frame 0 (the official loop never ended there).
    """
    if length < 1:
        raise ValueError(f"clip_frame_indices: video length is {length}, expected >= 1")
    if not 0 <= start < length:
        raise ValueError(f"clip_frame_indices: start {start} outside 0..{length - 1}")
    if length == 1:
        return [0] * num_frames
    out = list(range(start, length - 1))[:num_frames]
    period = 2 * (length - 1)
    k = 0
    while len(out) < num_frames:
        c = k % period
        out.append(length - 1 - c if c < length - 1 else c - (length - 1))
        k += 1
    return out


def clip_starts(lengths: Sequence[int], num_frames: int, sample_each_frame: bool = False) -> list[tuple[int, int]]:
    """The training samples as (video position, start frame).

    lengths: frames per video. Without ``sample_each_frame`` every start f with f + T ≤ length, and start 0
    for videos shorter than T (Σ max(1, length − T + 1) samples); with it, every frame is a start.
    """
    out = []
    for v, length in enumerate(lengths):
        last = length - 1 if sample_each_frame else max(0, length - num_frames)
        out.extend((v, f) for f in range(last + 1))
    return out


def _read_frame(index: VideoIndex, video: dict, t: int, expected_hw: tuple[int, int] | None) -> Image.Image:
    """Frame t of a video as a PIL RGB image, checked to exist and to have the video's size."""
    path = os.path.join(index.image_root, video["file_names"][t])
    where = f"{index.ann_file}: video {video['id']}: frame {t}"
    if not os.path.isfile(path):
        raise DatasetError(f"{where}: file {path} not found")
    try:
        with Image.open(path) as img:
            image = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DatasetError(f"{where}: file {path} cannot be decoded ({err})") from err
    if expected_hw is not None and (image.height, image.width) != expected_hw:
        raise DatasetError(f"{where}: file {path} is {image.height}x{image.width} (HxW), the annotation file "
                           f"says {expected_hw[0]}x{expected_hw[1]}")
    return image


def _check_lengths(index: VideoIndex) -> None:
    # load_ytvis already compares segmentations with file_names; bboxes / areas may be null or a list.
    for video in index.videos:
        n = len(video["file_names"])
        if n == 0:
            raise DatasetError(f"{index.ann_file}: video {video['id']}: field 'file_names' is empty")
        for ann in index.annotations(video["id"]):
            for key in ("segmentations", "bboxes", "areas"):
                value = ann.get(key)
                if value is not None and len(value) != n:
                    raise DatasetError(f"{index.ann_file}: annotation {ann['id']} (video {video['id']}): field "
                                       f"'{key}' has {len(value)} entries, the video has {n} frames")


class VISTrainDataset(Dataset):
    """Training clips of a YouTube-VIS-format dataset.

    Item: (frames, target) as produced by ``transforms`` (default pipeline: frames (T, 3, H, W) float
    normalised, target from :class:`~devis_core.data.vis_transforms.ToClipTargets`). Without transforms:
    frames a ``tv_tensors.Video`` (T, 3, H, W) uint8 RGB and the raw clip target of :meth:`raw_clip`.
    """

    def __init__(self, image_root: str, ann_file: str, num_frames: int, transforms: Callable | None = None,
                 sample_each_frame: bool = False, num_classes: int | None = None):
        if num_frames < 1:
            raise ValueError(f"VISTrainDataset: num_frames is {num_frames}, expected >= 1")
        self.index = load_ytvis(ann_file, image_root)
        _check_lengths(self.index)
        if num_classes is not None:
            bad = [c for c in self.index.categories if not 1 <= c <= num_classes]
            if bad:
                raise DatasetError(f"{self.index.ann_file}: category id {bad[0]} outside 1..{num_classes} "
                                   f"(class index = id - 1)")
        self.num_frames = int(num_frames)
        self.transforms = transforms
        self.samples = clip_starts([len(v["file_names"]) for v in self.index.videos], self.num_frames,
                                   sample_each_frame)

    def __len__(self) -> int:
        return len(self.samples)

    def raw_clip(self, idx: int) -> tuple[tv_tensors.Video, dict]:
        """Untransformed clip of sample ``idx``.

        Returns frames (T, 3, H, W) uint8 RGB and a target, instance-major (n·T + t) over the video's
        non-crowd annotations: boxes BoundingBoxes (N·T, 4) xyxy pixels clipped to the frame (0 where
        absent), masks Mask (N·T, H, W) uint8, valid (N·T,) bool, labels (N,) int64 0-based, orig_size (2,),
        video_id (), frame_ids (T,).
        """
        v, start = self.samples[idx]
        video = self.index.videos[v]
        vid, h, w = video["id"], video["height"], video["width"]
        frame_ids = clip_frame_indices(len(video["file_names"]), start, self.num_frames)
        unique = sorted(set(frame_ids))
        pixels = {t: np.asarray(_read_frame(self.index, video, t, (h, w))) for t in unique}
        frames = torch.from_numpy(np.stack([pixels[t] for t in frame_ids])).permute(0, 3, 1, 2).contiguous()

        anns = [a for a in self.index.annotations(vid) if not a.get("iscrowd", 0)]
        n, t_len = len(anns), self.num_frames
        # The official loader paints one label map per frame (value i+1 for annotation i), so where two
        # annotations overlap the later one owns the pixel; int16 keeps OVIS' many instances apart.
        owner = np.zeros((len(unique), h, w), dtype=np.int16)
        slot = {t: k for k, t in enumerate(unique)}
        boxes = np.zeros((n, len(unique), 4), dtype=np.float32)
        present = np.zeros((n, len(unique)), dtype=bool)
        for i, ann in enumerate(anns):
            for t in unique:
                seg = ann["segmentations"][t]
                if seg is None:
                    continue
                try:
                    mask = decode_segmentation(seg, h, w)
                except ValueError as exc:
                    raise DatasetError(f"{self.index.ann_file}: annotation {ann['id']} (video {vid}): "
                                       f"segmentations[{t}]: {exc}") from exc
                owner[slot[t]][mask] = i + 1
                present[i, slot[t]] = True
                box = ann["bboxes"][t] if ann.get("bboxes") is not None else None
                boxes[i, slot[t]] = box if box is not None else mask_to_box(mask)
        order = np.array([slot[t] for t in frame_ids], dtype=np.int64)
        masks = owner[order][None] == np.arange(1, n + 1, dtype=np.int16).reshape(n, 1, 1, 1)
        boxes, present = boxes[:, order], present[:, order]
        boxes[..., 2:] += boxes[..., :2]
        boxes[..., 0::2] = boxes[..., 0::2].clip(0, w)
        boxes[..., 1::2] = boxes[..., 1::2].clip(0, h)
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes.reshape(n * t_len, 4)), format="XYXY",
                                              canvas_size=(h, w)),
            "masks": tv_tensors.Mask(torch.from_numpy(masks.reshape(n * t_len, h, w)).to(torch.uint8)),
            "valid": torch.from_numpy(present.reshape(-1)),
            "labels": torch.tensor([a["category_id"] - 1 for a in anns], dtype=torch.int64),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            "video_id": torch.tensor(vid, dtype=torch.int64),
            "frame_ids": torch.tensor(frame_ids, dtype=torch.int64),
        }
        return tv_tensors.Video(frames), target

    def __getitem__(self, idx: int):
        frames, target = self.raw_clip(idx)
        if self.transforms is not None:
            return self.transforms(frames, target)
        return frames, target


class VISTestDataset(Dataset):
    """Whole videos for inference, one item per video in file order.

    Item: (frames (L, 3, h, w) float normalised RGB, info) with info = video_id (int), orig_size (H, W),
    size (h, w), length L, file_names. Frames are resized with PIL bilinear (antialiased) so the short side
    is ``min_size`` and the long side at most ``max_size`` (DETR rule, int truncation; spec §7.2).
    """

    def __init__(self, image_root: str, ann_file: str, min_size: int = 360, max_size: float = 640,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.index = load_ytvis(ann_file, image_root)
        _check_lengths(self.index)
        self.min_size, self.max_size = int(min_size), max_size
        self.mean, self.std = list(mean), list(std)

    def __len__(self) -> int:
        return len(self.index)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) a frame of (height, width) is resized to."""
        return detr_resize_size((height, width), self.min_size, self.max_size)

    def load_frames(self, idx: int, frame_ids: Sequence[int] | None = None) -> Tensor:
        """Frames ``frame_ids`` (default: all) of video ``idx``, resized and normalised.

        Returns (len(frame_ids), 3, h, w) float. Lets a caller read a long video clip by clip.
        """
        video = self.index.videos[idx]
        h, w = video["height"], video["width"]
        size = self.output_size(h, w)
        if frame_ids is None:
            frame_ids = range(len(video["file_names"]))
        frames = []
        for t in frame_ids:
            if not 0 <= t < len(video["file_names"]):
                raise IndexError(f"{self.index.ann_file}: video {video['id']}: frame index {t} outside "
                                 f"0..{len(video['file_names']) - 1}")
            image = _read_frame(self.index, video, t, (h, w))
            # Resized as PIL, not as a tensor: PIL's antialiased bilinear is what the official test used.
            frames.append(F.pil_to_tensor(F.resize(image, list(size))))
        return F.normalize(torch.stack(frames).to(torch.float32) / 255.0, self.mean, self.std)

    def __getitem__(self, idx: int) -> tuple[Tensor, dict]:
        video = self.index.videos[idx]
        h, w = video["height"], video["width"]
        info = {"video_id": video["id"], "orig_size": (h, w), "size": self.output_size(h, w),
                "length": len(video["file_names"]), "file_names": list(video["file_names"])}
        return self.load_frames(idx), info


def collate_clips(batch: Sequence[tuple[Tensor, dict]], pad_multiple: int = 0) -> tuple[NestedTensor, list[dict]]:
    """Stack B training clips into one batch of B·T frames (clip-major), padded to the largest size.

    batch: B items of (frames (T, 3, H_b, W_b), target). Returns (NestedTensor tensors (B·T, 3, H, W),
    mask (B·T, H, W) True on padding; list of B targets). DeVIS trains one clip per GPU, then nothing is
    padded, unless ``pad_multiple`` > 0 (INPUT.TRAIN_PAD_MULTIPLE): H and W are then rounded up to
    multiples of it, and each target's ``masks`` (N, H_b, W_b) are zero-padded to (N, H, W) so the mask
    loss compares predictions and targets on the same canvas (boxes stay normalised by the clip's size).
    """
    frames, targets = zip(*batch)
    nested = nested_tensor_from_tensor_list([f for clip in frames for f in clip.unbind(0)])
    return pad_batch_to_multiple(nested, targets, pad_multiple)


def collate_videos(batch: Sequence[tuple[Tensor, dict]]) -> tuple[Tensor, dict]:
    """Test loader collation: videos differ in length, so a batch holds exactly one video.

    Returns (frames (L, 3, h, w), info) of that video.
    """
    if len(batch) != 1:
        raise ValueError(f"collate_videos: a test batch holds one video, got {len(batch)}")
    return batch[0]


def _vis_paths(cfg, name: str) -> tuple[str, str, int]:
    kind, image_root, ann_file, num_classes = resolve_dataset(cfg.DATASETS.DATA_PATH, name)
    if kind != "vis":
        raise DatasetError(f"dataset {name!r} is a {kind!r} dataset; a VIS dataset is needed here")
    return image_root, ann_file, num_classes


def build_vis_train_dataset(cfg) -> tuple[VISTrainDataset, int]:
    """Training clips of DATASETS.TRAIN_DATASET with the official augmentation.

    Reads MODEL.DEVIS.NUM_FRAMES, INPUT.SCALE_FACTOR_TRAIN, INPUT.DEVIS.{MULTI_SCALE_TRAIN,
    SAMPLE_EACH_FRAME, CREATE_BBX_FROM_MASK, BGR_TRAINING} (the last feeds BGR frames, as the official
    training did). Returns (dataset, num_classes).
    """
    image_root, ann_file, num_classes = _vis_paths(cfg, cfg.DATASETS.TRAIN_DATASET)
    t = cfg.MODEL.DEVIS.NUM_FRAMES
    transforms = make_train_clip_transforms(t, cfg.INPUT.SCALE_FACTOR_TRAIN, cfg.INPUT.DEVIS.MULTI_SCALE_TRAIN,
                                            cfg.INPUT.DEVIS.CREATE_BBX_FROM_MASK,
                                            cfg.INPUT.DEVIS.BGR_TRAINING)
    dataset = VISTrainDataset(image_root, ann_file, t, transforms, cfg.INPUT.DEVIS.SAMPLE_EACH_FRAME,
                              num_classes)
    return dataset, num_classes


def build_vis_test_dataset(cfg) -> tuple[VISTestDataset, int]:
    """Test videos of DATASETS.VAL_DATASET resized by INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST.

    Returns (dataset, num_classes).
    """
    image_root, ann_file, num_classes = _vis_paths(cfg, cfg.DATASETS.VAL_DATASET)
    return VISTestDataset(image_root, ann_file, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST), num_classes


def build_vis_loader(cfg, dataset: Dataset, train: bool, sampler: Sampler | None = None,
                     generator: torch.Generator | None = None) -> DataLoader:
    """DataLoader over a VIS dataset with NUM_WORKERS workers (frames are decoded and augmented there).

    Training: SOLVER.BATCH_SIZE clips per batch, shuffled unless a (distributed) ``sampler`` is given,
    :func:`collate_clips` (padded to multiples of INPUT.TRAIN_PAD_MULTIPLE). Test: one video per batch
    in order, :func:`collate_videos`.
    """
    workers = int(cfg.NUM_WORKERS)
    # workers leave SIGTERM to the main process, which stops training cleanly on it (interrupt.py)
    common = {"num_workers": workers, "persistent_workers": False, "pin_memory": False,
              "worker_init_fn": ignore_sigterm_in_worker}
    if train:
        collate = functools.partial(collate_clips, pad_multiple=int(cfg.INPUT.TRAIN_PAD_MULTIPLE))
        return DataLoader(dataset, batch_size=int(cfg.SOLVER.BATCH_SIZE), shuffle=sampler is None,
                          sampler=sampler, collate_fn=collate, drop_last=False, generator=generator,
                          **common)
    return DataLoader(dataset, batch_size=1, shuffle=False, sampler=sampler, collate_fn=collate_videos, **common)
