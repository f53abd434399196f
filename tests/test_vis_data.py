"""Tests of devis_core.data.vis (VIS datasets, clip sampling) and devis_core.data.vis_transforms."""
from __future__ import annotations

import json
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from devis_core.config import get_cfg_defaults
from devis_core.data.synthetic import make_synthetic_vis
from devis_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from devis_core.data.vis import (VISTestDataset, VISTrainDataset, build_vis_loader, build_vis_test_dataset,
                                 build_vis_train_dataset, clip_frame_indices, clip_starts, collate_clips)
from devis_core.data.vis_transforms import (ClipPhotometricDistort, ClipRandomSizeCrop, ToClipTargets,
                                            cast_uint8_wrapping, fill_invalid_boxes, hsv_to_rgb,
                                            make_train_clip_transforms, masks_to_boxes_xyxy, rgb_to_hsv)
from devis_core.data.ytvis_format import DatasetError
from devis_core.models.nested import NestedTensor


# ------------------------------------------------------------------------------------------ hand datasets

def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _write_dataset(root, videos: list[dict], annotations: list[dict], num_categories: int = 3) -> tuple[str, str]:
    """videos: dicts with id, frames (list of (H, W, 3) uint8), optional name. Frames are written as PNG
    (lossless, so pixel values can be compared)."""
    image_root = os.path.join(str(root), "JPEGImages")
    records = []
    for v in videos:
        names = []
        for t, frame in enumerate(v["frames"]):
            name = f"{v.get('name', 'vid%d' % v['id'])}/{t:05d}.png"
            os.makedirs(os.path.dirname(os.path.join(image_root, name)), exist_ok=True)
            Image.fromarray(frame).save(os.path.join(image_root, name))
            names.append(name)
        h, w = v["frames"][0].shape[:2]
        records.append({"id": v["id"], "width": w, "height": h, "length": len(names), "file_names": names})
    ann_file = os.path.join(str(root), "instances.json")
    data = {"videos": records, "annotations": annotations,
            "categories": [{"id": i + 1, "name": f"c{i + 1}"} for i in range(num_categories)]}
    with open(ann_file, "w") as fh:
        json.dump(data, fh)
    return image_root, ann_file


def _ann(ann_id: int, video_id: int, category_id: int, masks: list, iscrowd: int = 0, with_boxes: bool = True):
    segs = [None if m is None else _rle(m) for m in masks]
    boxes = [None if m is None else [float(v) for v in mask_utils.toBbox(mask_utils.encode(
        np.asfortranarray(m.astype(np.uint8))))] for m in masks]
    return {"id": ann_id, "video_id": video_id, "category_id": category_id, "segmentations": segs,
            "bboxes": boxes if with_boxes else None, "areas": None, "iscrowd": iscrowd}


def _rect(h, w, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# ------------------------------------------------------------------------------------------ clip sampling

@pytest.mark.parametrize("length,start,num_frames,expected", [
    (10, 2, 4, [2, 3, 4, 5]),
    (10, 6, 4, [6, 7, 8, 9]),           # last regular start: ends on the last frame
    (3, 0, 6, [0, 1, 2, 1, 0, 1]),      # short video: bounce
    (2, 0, 5, [0, 1, 0, 1, 0]),
    (4, 0, 9, [0, 1, 2, 3, 2, 1, 0, 1, 2]),
    (1, 0, 3, [0, 0, 0]),
    (5, 4, 3, [4, 3, 2]),               # SAMPLE_EACH_FRAME, start on the last frame
    (5, 3, 4, [3, 4, 3, 2]),            # SAMPLE_EACH_FRAME, late start
])
def test_clip_frame_indices_hand_cases(length, start, num_frames, expected):
    assert clip_frame_indices(length, start, num_frames) == expected


def test_clip_frame_indices_rejects_bad_start():
    with pytest.raises(ValueError, match="start 5 outside 0..4"):
        clip_frame_indices(5, 5, 3)


def test_clip_starts_and_epoch_length():
    starts = clip_starts([10, 3, 6], num_frames=6)
    assert starts == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (2, 0)]
    assert len(starts) == sum(max(1, n - 6 + 1) for n in [10, 3, 6]) == 7
    every = clip_starts([10, 3, 6], num_frames=6, sample_each_frame=True)
    assert len(every) == 19
    assert every[10:13] == [(1, 0), (1, 1), (1, 2)]


# ------------------------------------------------------------------------------------------ pure helpers

def test_rgb_hsv_hand_values_and_round_trip():
    rgb = torch.tensor([[255., 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 0, 0], [100, 100, 100],
                        [0, 128, 255]]).T.reshape(3, 7, 1)
    hsv = rgb_to_hsv(rgb).reshape(3, 7).T
    expected = torch.tensor([[0., 1, 255], [120, 1, 255], [240, 1, 255], [60, 1, 255], [0, 0, 0],
                             [0, 0, 100], [240 + 60 * (0 - 128) / 255, 1, 255]])
    torch.testing.assert_close(hsv, expected)
    x = torch.rand(2, 3, 5, 6) * 255
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-3, rtol=1e-4)
    # saturation above 1 (the official op does not clip): h=0, s=2, v=100 -> (v, v(1-s), v(1-s))
    out = hsv_to_rgb(torch.tensor([0.0, 2.0, 100.0]).view(3, 1, 1)).flatten()
    torch.testing.assert_close(out, torch.tensor([100.0, -100.0, -100.0]))


def test_cast_uint8_wraps_like_numpy():
    x = torch.tensor([260.7, -3.5, 12.9, 255.0, 511.2])
    assert cast_uint8_wrapping(x).tolist() == [4, 253, 12, 255, 255]


def test_masks_to_boxes_is_one_pixel_less():
    masks = torch.zeros(3, 8, 10, dtype=torch.bool)
    masks[0, 1:4, 2:6] = True          # rows 1..3, cols 2..5
    masks[1, 7, 9] = True
    boxes = masks_to_boxes_xyxy(masks)
    assert boxes.tolist() == [[2.0, 1.0, 5.0, 3.0], [9.0, 7.0, 9.0, 7.0], [0.0, 0.0, 0.0, 0.0]]


def test_fill_invalid_boxes_nearest_with_earlier_tie():
    boxes = torch.arange(6 * 4, dtype=torch.float32).view(1, 6, 4) / 100
    valid = torch.tensor([[False, True, False, False, True, False]])
    out = fill_invalid_boxes(boxes, valid)[0]
    source = [1, 1, 1, 4, 4, 4]     # t=2: |2-1| < |2-4|; t=3: |3-4| < |3-1|
    for t in range(6):
        if valid[0, t]:
            assert torch.equal(out[t], boxes[0, t])
        else:
            assert out[t, :2].tolist() == boxes[0, source[t], :2].tolist()
            assert out[t, 2:].tolist() == pytest.approx([1e-6, 1e-6])
    tie = fill_invalid_boxes(boxes[:, :3], torch.tensor([[True, False, True]]))[0]
    assert tie[1, :2].tolist() == boxes[0, 0, :2].tolist()


# ------------------------------------------------------------------------------------------ targets

def _raw_clip(masks: torch.Tensor, valid: torch.Tensor, labels: list[int], boxes: torch.Tensor | None = None,
              t_len: int | None = None):
    """masks (N·T, H, W) bool, instance-major."""
    h, w = masks.shape[-2:]
    t_len = t_len if t_len is not None else masks.shape[0] // len(labels)
    if boxes is None:
        boxes = torch.zeros(masks.shape[0], 4)
    frames = tv_tensors.Video(torch.zeros(t_len, 3, h, w, dtype=torch.uint8))
    return frames, {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
                    "masks": tv_tensors.Mask(masks.to(torch.uint8)), "valid": valid,
                    "labels": torch.tensor(labels), "orig_size": torch.tensor([h, w])}


def test_to_clip_targets_hand_case_filler_drop_and_pixel_rule():
    h, w, t_len = 8, 10, 3
    masks = torch.zeros(3 * t_len, h, w, dtype=torch.bool)
    masks[0, 1:4, 2:6] = True                  # inst 0, t0: box (2,1)-(5,3)
    masks[1, 0:2, 0:2] = True                  # inst 0, t1: annotated but 4 px -> valid
    masks[2, 5, 5:7] = True                    # inst 0, t2: 2 px -> invalid
    masks[3, 2:5, 2:5] = True                  # inst 1, t0: annotated as absent -> stays invalid
    masks[6:9, 4, 4] = True                    # inst 2: 1 px everywhere -> dropped
    valid = torch.tensor([1, 1, 1, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    frames, target = _raw_clip(masks, valid, [2, 0, 1])
    x, out = ToClipTargets(t_len, create_box_from_mask=True)(frames, target)
    assert x.shape == (t_len, 3, h, w) and x.dtype == torch.float32
    assert out["num_trajectories"].item() == 1
    assert out["valid"].tolist() == [True, True, False]
    assert out["labels"].tolist() == [2, 2, 2]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    # t0: masks_to_boxes xyxy (2, 1, 5, 3) -> cx 3.5, cy 2, w 3, h 2
    torch.testing.assert_close(out["boxes"][0] * scale, torch.tensor([3.5, 2.0, 3.0, 2.0]))
    # t1: (0, 0, 1, 1) -> cx 0.5, cy 0.5, w 1, h 1
    torch.testing.assert_close(out["boxes"][1] * scale, torch.tensor([0.5, 0.5, 1.0, 1.0]))
    # t2: nearest valid frame is t1
    torch.testing.assert_close(out["boxes"][2], torch.tensor([0.5 / w, 0.5 / h, 1e-6, 1e-6]))
    assert torch.equal(out["masks"], masks[0:3])
    assert out["size"].tolist() == [h, w] and out["orig_size"].tolist() == [h, w]


def test_to_clip_targets_keeps_annotation_boxes_without_create_bbx():
    h, w = 8, 10
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[:, 1:4, 2:6] = True
    boxes = torch.tensor([[2.0, 1.0, 6.0, 4.0], [1.0, 1.0, 7.0, 5.0]])
    frames, target = _raw_clip(masks, torch.tensor([True, True]), [0], boxes)
    _, out = ToClipTargets(2, create_box_from_mask=False)(frames, target)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    torch.testing.assert_close(out["boxes"] * scale, torch.tensor([[4.0, 2.5, 4.0, 3.0], [4.0, 3.0, 6.0, 4.0]]))


def test_to_clip_targets_no_instances():
    frames, target = _raw_clip(torch.zeros(0, 6, 7, dtype=torch.bool), torch.zeros(0, dtype=torch.bool), [],
                               t_len=2)
    _, out = ToClipTargets(2)(frames, target)
    assert out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 6, 7) and out["num_trajectories"] == 0


def test_bgr_option_swaps_channels():
    frames = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    frames[0, 0], frames[0, 1], frames[0, 2] = 255, 0, 51          # R, G, B
    masks = torch.ones(1, 2, 2, dtype=torch.bool)
    _, target = _raw_clip(masks, torch.tensor([True]), [0])
    rgb, _ = ToClipTargets(1, bgr=False)(tv_tensors.Video(frames), target)
    bgr, _ = ToClipTargets(1, bgr=True)(tv_tensors.Video(frames), target)
    m, s = IMAGENET_MEAN, IMAGENET_STD
    assert rgb[0, :, 0, 0].tolist() == pytest.approx([(1 - m[0]) / s[0], (0 - m[1]) / s[1], (0.2 - m[2]) / s[2]])
    assert bgr[0, :, 0, 0].tolist() == pytest.approx([(0.2 - m[0]) / s[0], (0 - m[1]) / s[1], (1 - m[2]) / s[2]])


# ------------------------------------------------------------------------------------------ augmentation

def _geometry_clip(t_len=3, h=120, w=160):
    """T identical frames whose red channel is the mask of instance 0: geometry must move them together."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[25:75, 12:62] = True
    mask[75:100, 62:112] = True
    frames = torch.full((t_len, 3, h, w), 40, dtype=torch.uint8)
    frames[:, 0][:, mask] = 255
    masks = mask.expand(t_len, h, w).clone()
    boxes = torch.tensor([[12.0, 25.0, 112.0, 100.0]]).expand(t_len, 4).clone()
    valid = torch.ones(t_len, dtype=torch.bool)
    return tv_tensors.Video(frames), {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
        "masks": tv_tensors.Mask(masks.to(torch.uint8)), "valid": valid, "labels": torch.tensor([1]),
        "orig_size": torch.tensor([h, w])}


@pytest.mark.parametrize("multi_scale", [True, False])
def test_geometry_is_drawn_once_per_clip(multi_scale):
    torch.manual_seed(0)
    t_len = 3
    transform = make_train_clip_transforms(t_len, scale_factor=0.25, multi_scale=multi_scale,
                                           create_box_from_mask=False, photometric=False)
    m, s = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    sizes, flips = set(), set()
    for _ in range(20):
        frames, target = _geometry_clip(t_len)
        x, out = transform(frames, target)
        # every frame went through the same flip, crop and resize
        assert torch.equal(x, x[:1].expand_as(x))
        assert torch.equal(out["masks"], out["masks"][:1].expand_as(out["masks"]))
        h, w = x.shape[-2:]
        sizes.add((h, w))
        assert out["size"].tolist() == [h, w] and out["masks"].shape[-2:] == (h, w)
        # image and mask moved together: the red channel marks the mask (edges differ: bilinear frames,
        # nearest masks, as cv2 INTER_NEAREST in the official code)
        red = (x[0] * s + m)[0] > 0.6
        mask = out["masks"][0]
        if mask.sum() > 2:
            iou = (red & mask).sum() / (red | mask).sum()
            assert iou > 0.8       # a frame moved differently from its mask scores far lower
            # boxes came through the same transforms as the mask (resize rounding: ~1 px)
            scale = torch.tensor([w, h, w, h])
            cx, cy, bw, bh = (out["boxes"][0] * scale).tolist()
            mb = masks_to_boxes_xyxy(mask[None])[0].tolist()
            assert abs((cx - bw / 2) - mb[0]) <= 2.0 and abs((cx + bw / 2) - (mb[2] + 1)) <= 2.0
            assert abs((cy - bh / 2) - mb[1]) <= 2.0 and abs((cy + bh / 2) - (mb[3] + 1)) <= 2.0
            # the mask is asymmetric: its top block lies on the left unless the clip was flipped
            cols = mask.nonzero()[:, 1]
            top = mask[: int(mask.nonzero()[:, 0].float().mean())].nonzero()[:, 1]
            flips.add(bool(top.float().mean() > cols.float().mean()))
    assert len(sizes) > 3            # the multi-scale draw really varies between clips
    assert flips == {True, False}    # both flipped and unflipped clips occurred


def test_crop_is_skipped_below_min_size_and_bounded():
    torch.manual_seed(1)
    crop = ClipRandomSizeCrop(20, 30)
    frames, target = _geometry_clip(2, h=19, w=160)
    out, _ = crop(frames, target)
    assert out.shape[-2:] == (19, 160)
    for _ in range(10):
        frames, target = _geometry_clip(2)
        out, tgt = crop(frames, target)
        h, w = out.shape[-2:]
        assert 20 <= h <= 30 and 20 <= w <= 30
        assert tgt["masks"].shape[-2:] == (h, w) and tgt["boxes"].canvas_size == (h, w)
        b = tgt["boxes"].as_subclass(torch.Tensor)
        assert (b[:, 0::2] <= w).all() and (b[:, 1::2] <= h).all() and (b >= 0).all()


def test_photometric_distortion_is_per_frame():
    torch.manual_seed(0)
    base = torch.randint(0, 256, (3, 12, 16), dtype=torch.uint8)
    frames = tv_tensors.Video(base.expand(8, 3, 12, 16).clone())
    out, _ = ClipPhotometricDistort()(frames, {})
    assert isinstance(out, tv_tensors.Video) and out.dtype == torch.uint8 and out.shape == frames.shape
    distinct = {tuple(out[t].flatten().tolist()) for t in range(8)}
    assert len(distinct) >= 4          # frames get their own draws (all-equal would be one value)
    clamped, _ = ClipPhotometricDistort(wrap_overflow=False)(frames, {})
    assert clamped.dtype == torch.uint8


def test_photometric_identity_when_no_op_fires(monkeypatch):
    # every coin says "no": the frame comes back unchanged (HSV round trip + uint8 cast are exact here)
    import devis_core.data.vis_transforms as vt
    monkeypatch.setattr(vt, "_coin", lambda t, p=0.5: torch.zeros(t, dtype=torch.bool))
    frames = tv_tensors.Video(torch.randint(0, 256, (2, 3, 5, 6), dtype=torch.uint8))
    out, _ = ClipPhotometricDistort(wrap_overflow=False)(frames, {})
    assert torch.equal(out, frames)


# ------------------------------------------------------------------------------------------ datasets

def test_train_dataset_raw_clip_hand_case(tmp_path):
    h, w = 12, 16
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(3)]
    a = _rect(h, w, 2, 6, 3, 9)
    b = _rect(h, w, 4, 8, 6, 12)          # overlaps a; later annotation owns the overlap
    anns = [_ann(1, 7, 2, [a, a, None]), _ann(2, 7, 3, [b, None, b], with_boxes=False),
            _ann(3, 7, 1, [a, a, a], iscrowd=1)]
    image_root, ann_file = _write_dataset(tmp_path, [{"id": 7, "frames": frames}], anns)
    ds = VISTrainDataset(image_root, ann_file, num_frames=5)
    assert len(ds) == 1
    video, target = ds.raw_clip(0)
    order = [0, 1, 2, 1, 0]
    assert target["frame_ids"].tolist() == order
    assert torch.equal(video, torch.from_numpy(np.stack([frames[t] for t in order])).permute(0, 3, 1, 2))
    assert target["labels"].tolist() == [1, 2]                      # crowd left out, id - 1
    assert target["valid"].tolist() == [True, True, False, True, True, True, False, True, False, True]
    masks = target["masks"].bool()
    a_only = torch.from_numpy(a & ~b)
    assert torch.equal(masks[0], a_only) and torch.equal(masks[1], torch.from_numpy(a))
    assert not masks[2].any() and torch.equal(masks[5], torch.from_numpy(b))
    boxes = target["boxes"].as_subclass(torch.Tensor)
    assert boxes[0].tolist() == [3.0, 2.0, 9.0, 6.0]               # annotation xywh -> xyxy
    assert boxes[5].tolist() == [6.0, 4.0, 12.0, 8.0]              # null bboxes: box of the mask
    assert boxes[2].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert target["video_id"].item() == 7 and target["orig_size"].tolist() == [h, w]


def test_missing_frame_error_names_video_and_file(tmp_path):
    frames = [np.zeros((8, 8, 3), dtype=np.uint8) for _ in range(3)]
    image_root, ann_file = _write_dataset(tmp_path, [{"id": 4, "frames": frames}],
                                          [_ann(1, 4, 1, [_rect(8, 8, 1, 4, 1, 4)] * 3)])
    missing = os.path.join(image_root, "vid4", "00001.png")
    os.remove(missing)
    ds = VISTrainDataset(image_root, ann_file, num_frames=2)
    with pytest.raises(DatasetError, match=r"video 4: frame 1: file .*vid4/00001\.png not found"):
        ds[0]
    test_ds = VISTestDataset(image_root, ann_file)
    with pytest.raises(DatasetError, match=r"video 4: frame 1: file .*00001\.png not found"):
        test_ds[0]


def test_length_mismatch_error_names_video_and_file(tmp_path):
    frames = [np.zeros((8, 8, 3), dtype=np.uint8) for _ in range(3)]
    ann = _ann(9, 4, 1, [_rect(8, 8, 1, 4, 1, 4)] * 2)      # 2 segmentations, 3 frames
    image_root, ann_file = _write_dataset(tmp_path, [{"id": 4, "frames": frames}], [ann])
    with pytest.raises(DatasetError, match=r"instances\.json.*annotation 9.*segmentations.* video 4 has 3 frames"):
        VISTrainDataset(image_root, ann_file, num_frames=2)
    with pytest.raises(DatasetError, match=r"instances\.json.*annotation 9"):
        VISTestDataset(image_root, ann_file)


def test_frame_of_wrong_size_is_reported(tmp_path):
    frames = [np.zeros((8, 8, 3), dtype=np.uint8) for _ in range(2)]
    image_root, ann_file = _write_dataset(tmp_path, [{"id": 3, "frames": frames}],
                                          [_ann(1, 3, 1, [_rect(8, 8, 1, 4, 1, 4)] * 2)])
    Image.fromarray(np.zeros((9, 8, 3), dtype=np.uint8)).save(os.path.join(image_root, "vid3", "00000.png"))
    with pytest.raises(DatasetError, match=r"video 3: frame 0: file .*00000\.png is 9x8 .*says 8x8"):
        VISTrainDataset(image_root, ann_file, num_frames=2)[0]


def test_test_size_rule_and_pixels(tmp_path):
    frame = np.random.default_rng(1).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    image_root, ann_file = _write_dataset(tmp_path, [{"id": 1, "frames": [frame, frame[::-1].copy()]}], [])
    ds = VISTestDataset(image_root, ann_file, min_size=360, max_size=640)
    x, info = ds[0]
    assert x.shape == (2, 3, 360, 640)
    assert info["size"] == (360, 640) and info["orig_size"] == (720, 1280) and info["video_id"] == 1
    assert info["length"] == 2
    ref = np.asarray(Image.fromarray(frame).resize((640, 360), Image.BILINEAR), dtype=np.float32) / 255
    ref = (torch.from_numpy(ref).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(x[0], ref, atol=1e-5, rtol=0)
    assert ds.output_size(1920, 480) == (640, 160)          # long side caps: short = round(640·480/1920)
    assert ds.output_size(360, 500) == (360, 500)            # already at the size
    assert ds.load_frames(0, [1]).shape == (1, 3, 360, 640)


def _synthetic_cfg(tmp_path, workers: int):
    make_synthetic_vis(str(tmp_path), num_videos=(3, 2), frames=(3, 7), size=(40, 56), objects=(1, 3))
    cfg = get_cfg_defaults()
    cfg.DATASETS.TYPE = "vis"
    cfg.DATASETS.DATA_PATH = str(tmp_path)
    cfg.DATASETS.TRAIN_DATASET = "synthetic_vis_train"
    cfg.DATASETS.VAL_DATASET = "synthetic_vis_val"
    cfg.MODEL.DEVIS.NUM_FRAMES = 4
    cfg.INPUT.SCALE_FACTOR_TRAIN = 0.1
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 30, 50
    cfg.SOLVER.BATCH_SIZE = 1
    cfg.NUM_WORKERS = workers
    return cfg


def test_dataloader_with_workers_produces_batches(tmp_path):
    cfg = _synthetic_cfg(tmp_path, workers=2)
    ds, num_classes = build_vis_train_dataset(cfg)
    assert num_classes == 6
    lengths = [len(v["file_names"]) for v in ds.index.videos]
    assert len(ds) == sum(max(1, n - 4 + 1) for n in lengths)
    loader = build_vis_loader(cfg, ds, train=True, generator=torch.Generator().manual_seed(0))
    seen = 0
    for samples, targets in loader:
        assert isinstance(samples, NestedTensor) and samples.tensors.shape[:2] == (4, 3)
        assert not samples.mask.any()
        (t,) = targets
        n = t["num_trajectories"].item()
        assert t["boxes"].shape == (4 * n, 4) and t["labels"].shape == (4 * n,) and t["valid"].shape == (4 * n,)
        assert t["masks"].shape == (4 * n,) + tuple(samples.tensors.shape[-2:])
        assert t["size"].tolist() == list(samples.tensors.shape[-2:])
        assert (t["labels"] >= 0).all() and (t["labels"] < num_classes).all()
        assert t["valid"].view(n, 4).any(1).all()
        seen += 1
        if seen == 3:
            break
    assert seen == 3
    test_ds, _ = build_vis_test_dataset(cfg)
    frames, info = next(iter(build_vis_loader(cfg, test_ds, train=False)))
    assert frames.shape == (info["length"], 3) + info["size"]


def test_sample_each_frame_and_bgr_from_cfg(tmp_path):
    cfg = _synthetic_cfg(tmp_path, workers=0)
    cfg.INPUT.DEVIS.SAMPLE_EACH_FRAME = True
    cfg.INPUT.DEVIS.BGR_TRAINING = True
    ds, _ = build_vis_train_dataset(cfg)
    assert len(ds) == sum(len(v["file_names"]) for v in ds.index.videos)
    assert ds.transforms.transforms[-1].bgr is True
    samples, targets = collate_clips([ds[0], ds[1]])
    assert samples.tensors.shape[:2] == (8, 3) and len(targets) == 2


def test_build_rejects_coco_dataset(tmp_path):
    cfg = _synthetic_cfg(tmp_path, workers=0)
    from devis_core.data.synthetic import make_synthetic_coco
    make_synthetic_coco(str(tmp_path), num_images=(2, 1), size=(32, 32))
    cfg.DATASETS.TRAIN_DATASET = "synthetic_coco_train"
    with pytest.raises(DatasetError, match="'synthetic_coco_train' is a 'coco' dataset"):
        build_vis_train_dataset(cfg)


def test_collate_pads_clip_and_target_masks_to_multiples():
    from devis_core.data.vis import collate_clips

    frames = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).view(2, 3, 5, 7)
    masks = torch.zeros(4, 5, 7, dtype=torch.bool)
    masks[1, 4, 6] = True                       # bottom-right pixel of the clip
    target = {"masks": masks, "boxes": torch.tensor([[0.5, 0.5, 1.0, 1.0]]), "size": torch.tensor([5, 7])}
    plain, (t0,) = collate_clips([(frames, target)])
    assert plain.tensors.shape == (2, 3, 5, 7) and not plain.mask.any() and t0["masks"] is masks
    padded, (t1,) = collate_clips([(frames, target)], pad_multiple=4)
    assert padded.tensors.shape == (2, 3, 8, 8)
    assert torch.equal(padded.tensors[:, :, :5, :7], frames)
    assert not padded.tensors[:, :, 5:].any() and not padded.tensors[:, :, :, 7:].any()
    assert not padded.mask[:, :5, :7].any() and padded.mask[:, 5:].all() and padded.mask[:, :, 7:].all()
    assert t1["masks"].shape == (4, 8, 8) and t1["masks"].dtype == torch.bool
    assert torch.equal(t1["masks"][:, :5, :7], masks) and int(t1["masks"].sum()) == 1
    assert torch.equal(t1["boxes"], target["boxes"]) and target["masks"] is masks   # input untouched
    exact, _ = collate_clips([(frames[..., :4, :4], {"masks": masks[..., :4, :4]})], pad_multiple=4)
    assert exact.tensors.shape == (2, 3, 4, 4) and not exact.mask.any()
