"""COCO data: annotation checks, image errors and skip mode, DETR resize arithmetic, box/mask
consistency through flip / resize / crop, normalisation, collation and the config builder."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from devis_core.config import get_cfg_defaults
from devis_core.data.coco import CocoInstances, build_coco_dataset, collate_fn
from devis_core.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, RandomShortSideResize, RandomSizeCrop,
                                        ToModelInputs, detr_resize_size, make_train_transforms,
                                        make_val_transforms, wrap_target)
from devis_core.data.ytvis_format import DatasetError

H, W = 40, 60
# (ann id, image id, category id, x0, y0, x1, y1): axis-aligned rectangles, polygon segmentations
OBJECTS = [(1, 1, 3, 5, 4, 25, 20), (2, 1, 1, 30, 10, 55, 36), (3, 2, 2, 10, 12, 40, 30),
           (4, 2, 3, 0, 0, 12, 8)]


def write_dataset(root, objects=OBJECTS, image_ids=(1, 2), extra_anns=(), crowd_ids=()):
    (root / "img").mkdir(exist_ok=True)
    images = []
    for iid in image_ids:
        arr = np.full((H, W, 3), 40 * iid, dtype=np.uint8)
        Image.fromarray(arr).save(root / "img" / f"{iid}.png")
        images.append({"id": iid, "file_name": f"{iid}.png", "height": H, "width": W})
    anns = [{"id": aid, "image_id": iid, "category_id": cid, "bbox": [x0, y0, x1 - x0, y1 - y0],
             "area": (x1 - x0) * (y1 - y0), "iscrowd": int(aid in crowd_ids),
             "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]} for aid, iid, cid, x0, y0, x1, y1 in objects]
    data = {"images": images, "annotations": anns + list(extra_anns),
            "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps(data))
    return str(root / "img"), str(ann_file)


def pixel_boxes(target):
    """Normalised cx, cy, w, h target boxes back to xyxy pixels."""
    h, w = target["size"].tolist()
    b = target["boxes"].double() * torch.tensor([w, h, w, h], dtype=torch.float64)
    return torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1)


def mask_extent(masks):
    """xyxy extent (last pixel + 1) of each (H, W) mask."""
    out = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        out.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
    return torch.tensor(out, dtype=torch.float64)


def test_raw_items_labels_boxes_masks(tmp_path):
    ds = CocoInstances(*write_dataset(tmp_path), transforms=make_val_transforms(H, 1000), num_classes=3)
    assert len(ds) == 2
    img, t = ds[0]
    assert img.shape == (3, H, W)
    assert t["labels"].tolist() == [2, 0]                      # category id − 1
    assert t["image_id"].item() == 1 and t["orig_size"].tolist() == [H, W] and t["size"].tolist() == [H, W]
    assert torch.allclose(pixel_boxes(t), torch.tensor([[5., 4, 25, 20], [30, 10, 55, 36]], dtype=torch.float64),
                          atol=1e-4)
    assert t["masks"].dtype == torch.bool and t["masks"].shape == (2, H, W)
    assert torch.equal(mask_extent(t["masks"]), torch.tensor([[5., 4, 25, 20], [30, 10, 55, 36]], dtype=torch.float64))
    # image value 40 everywhere -> (40/255 − mean) / std per channel
    for c in range(3):
        assert img[c, 0, 0].item() == pytest.approx((40 / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], rel=1e-5)


def test_crowd_annotations_are_left_out(tmp_path):
    ds = CocoInstances(*write_dataset(tmp_path, crowd_ids=(2,)), transforms=make_val_transforms(H, 1000))
    assert ds[0][1]["labels"].tolist() == [2]


@pytest.mark.parametrize("hw,size,max_size,expected", [
    ((480, 640), 800, 1333, (800, 1066)),       # short side 800, long int(800·640/480) = 1066
    ((500, 2000), 800, 1333, (333, 1332)),      # long side caps: short = round(1333·500/2000) = 333
    ((600, 400), 400, None, (600, 400)),        # already the right size
    ((300, 200), 360, 640, (540, 360)),
])
def test_detr_resize_size(hw, size, max_size, expected):
    assert detr_resize_size(hw, size, max_size) == expected


def test_flip_mirrors_boxes_and_masks_together(tmp_path):
    image_root, ann_file = write_dataset(tmp_path)
    flip = v2.Compose([v2.RandomHorizontalFlip(1.0), ToModelInputs()])
    _, t = CocoInstances(image_root, ann_file, transforms=flip)[0]
    expected = torch.tensor([[W - 25., 4, W - 5, 20], [W - 55, 10, W - 30, 36]], dtype=torch.float64)
    assert torch.allclose(pixel_boxes(t), expected, atol=1e-4)
    assert torch.equal(mask_extent(t["masks"]), expected)


@pytest.mark.parametrize("seed", range(12))
def test_train_pipeline_keeps_boxes_and_masks_consistent(tmp_path, seed):
    """Whatever flip / resize / crop branch is drawn, every box stays the extent of its mask up to the
    nearest-neighbour rounding of the mask (two resizes that upscale up to ~2x: < 2.5 px; a missed
    flip or a wrong scale would be off by tens of pixels), boxes lie in the image and the sizes are
    the ones the recipe allows."""
    image_root, ann_file = write_dataset(tmp_path)
    ds = CocoInstances(image_root, ann_file, transforms=make_train_transforms(scale_factor=0.1))
    torch.manual_seed(seed)
    for i in range(len(ds)):
        img, t = ds[i]
        h, w = t["size"].tolist()
        assert img.shape == (3, h, w) and t["masks"].shape[1:] == (h, w)
        assert min(h, w) in [int(0.1 * s) for s in range(480, 801, 32)] or max(h, w) <= 133.3
        assert len(t["labels"]) == len(t["boxes"]) == len(t["masks"])
        assert (t["masks"].flatten(1).any(1)).all()
        boxes = pixel_boxes(t)
        assert (boxes >= -1e-4).all() and (boxes[:, 2] <= w + 1e-4).all() and (boxes[:, 3] <= h + 1e-4).all()
        if len(boxes):
            assert (boxes - mask_extent(t["masks"])).abs().max() < 2.5


def test_random_size_crop_clips_and_drops_instances():
    image = Image.new("RGB", (W, H))
    masks = torch.zeros(2, H, W, dtype=torch.uint8)
    masks[0, 4:20, 5:25] = 1
    masks[1, 10:36, 30:55] = 1
    target = wrap_target({"boxes": torch.tensor([[5., 4, 25, 20], [30, 10, 55, 36]]), "masks": masks,
                          "labels": torch.tensor([7, 8])}, (H, W))
    crop = RandomSizeCrop(20, 20)       # a 20×20 crop, only the offset is random
    for seed in range(20):
        torch.manual_seed(seed)
        img, t = crop(image, target)
        assert img.size == (20, 20)
        boxes = t["boxes"].as_subclass(torch.Tensor)
        assert len(boxes) == len(t["labels"]) == len(t["masks"])
        for b, m in zip(boxes, t["masks"].as_subclass(torch.Tensor).bool()):
            assert m.any()
            assert torch.equal(b.double(), mask_extent(m[None])[0])   # clipped box = visible mask extent


def test_random_short_side_resize_uses_detr_arithmetic():
    image = Image.new("RGB", (W, H))
    target = wrap_target({"boxes": torch.tensor([[6., 4, 30, 20]]), "labels": torch.tensor([0])}, (H, W))
    img, t = RandomShortSideResize([80], max_size=1000)(image, target)
    assert img.size == (120, 80)
    assert t["boxes"].as_subclass(torch.Tensor).tolist() == [[12.0, 8.0, 60.0, 40.0]]


def test_missing_and_corrupt_images_name_the_file_and_id(tmp_path):
    image_root, ann_file = write_dataset(tmp_path)
    (tmp_path / "img" / "1.png").unlink()
    ds = CocoInstances(image_root, ann_file, transforms=make_val_transforms(H, 1000))
    with pytest.raises(DatasetError, match=r"1\.png: image file of image id 1 .* does not exist"):
        ds[0]
    good = (tmp_path / "img" / "2.png").read_bytes()
    (tmp_path / "img" / "2.png").write_bytes(good[: len(good) // 2])        # truncated file
    with pytest.raises(DatasetError, match=r"2\.png: image id 2 cannot be decoded"):
        ds[1]


def test_corrupt_jpeg_raises(tmp_path):
    image_root, ann_file = write_dataset(tmp_path)
    data = json.loads(open(ann_file).read())
    data["images"][0]["file_name"] = "1.jpg"
    Image.new("RGB", (W, H), (200, 10, 10)).save(tmp_path / "img" / "1.jpg", quality=90)
    raw = bytearray((tmp_path / "img" / "1.jpg").read_bytes())
    (tmp_path / "img" / "1.jpg").write_bytes(bytes(raw[: len(raw) // 3]))
    (tmp_path / "ann.json").write_text(json.dumps(data))
    ds = CocoInstances(image_root, ann_file)
    with pytest.raises(DatasetError, match=r"1\.jpg: image id 1 cannot be decoded"):
        ds[0]


def test_image_size_mismatch_is_reported(tmp_path):
    image_root, ann_file = write_dataset(tmp_path)
    Image.new("RGB", (W + 1, H)).save(tmp_path / "img" / "2.png")
    with pytest.raises(DatasetError, match=r"2\.png: image id 2 is 40x61 .* says 40x60"):
        CocoInstances(image_root, ann_file)[1]


@pytest.mark.parametrize("bad,field", [
    ({"bbox": [1, 2, -3, 4]}, "'bbox'"),
    ({"category_id": 9}, "'category_id'"),
    ({"image_id": 77}, "'image_id'"),
    ({"segmentation": [[1, 2, 3]]}, "'segmentation'"),
    ({"segmentation": {"size": [5, 5], "counts": "abc"}}, "'segmentation'"),
    ({"iscrowd": 2}, "'iscrowd'"),
])
def test_invalid_annotation_names_file_and_annotation_id(tmp_path, bad, field):
    ann = {"id": 17, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0,
           "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]}
    ann.update(bad)
    image_root, ann_file = write_dataset(tmp_path, extra_anns=[ann])
    with pytest.raises(DatasetError, match=rf"ann\.json: annotation id 17 .*field {field}"):
        CocoInstances(image_root, ann_file, num_classes=3)
    # skip mode: the bad annotation is dropped with a warning, the rest loads
    with pytest.warns(UserWarning, match="annotation id 17"):
        ds = CocoInstances(image_root, ann_file, num_classes=3, skip_invalid=True,
                           transforms=make_val_transforms(H, 1000))
    assert ds[0][1]["labels"].tolist() == [2, 0]


def test_category_beyond_num_classes_is_refused(tmp_path):
    image_root, ann_file = write_dataset(tmp_path)
    with pytest.raises(DatasetError, match="categories\\[2\\]: field 'id' is 3, expected an int in 1..2"):
        CocoInstances(image_root, ann_file, num_classes=2)


def test_skip_mode_replaces_an_unreadable_image_with_a_warning(tmp_path):
    image_root, ann_file = write_dataset(tmp_path)
    (tmp_path / "img" / "1.png").write_bytes(b"not an image at all")
    ds = CocoInstances(image_root, ann_file, transforms=make_val_transforms(H, 1000), skip_invalid=True)
    with pytest.warns(UserWarning, match=r"1\.png: image id 1 cannot be decoded"):
        _, t = ds[0]
    assert t["image_id"].item() == 2
    assert ds.skipped_image_ids == [1]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert ds[1][1]["image_id"].item() == 2


def test_images_without_annotations_are_dropped(tmp_path):
    image_root, ann_file = write_dataset(tmp_path, objects=OBJECTS[:2], image_ids=(1, 2))
    assert CocoInstances(image_root, ann_file).ids == [1]
    assert CocoInstances(image_root, ann_file, remove_images_without_annotations=False).ids == [1, 2]


def test_collate_pads_and_masks(tmp_path):
    image_root, ann_file = write_dataset(tmp_path)
    a = (torch.ones(3, 4, 6), {"labels": torch.tensor([0])})
    b = (torch.full((3, 5, 3), 2.0), {"labels": torch.tensor([1])})
    nested, targets = collate_fn([a, b])
    assert nested.tensors.shape == (2, 3, 5, 6) and nested.mask.shape == (2, 5, 6)
    assert nested.mask[0, :4, :6].logical_not().all() and nested.mask[0, 4].all()
    assert nested.mask[1, :, 3:].all() and not nested.mask[1, :, :3].any()
    assert nested.tensors[1, :, :, 3:].abs().sum() == 0 and nested.tensors[0, :, 4].abs().sum() == 0
    assert [t["labels"].item() for t in targets] == [0, 1]


def test_collate_pads_images_and_target_masks_to_multiples():
    masks_a = torch.zeros(1, 4, 6, dtype=torch.bool)
    masks_a[0, 3, 5] = True                     # bottom-right pixel of image a
    masks_b = torch.ones(2, 5, 3, dtype=torch.bool)
    a = (torch.ones(3, 4, 6), {"labels": torch.tensor([0]), "masks": masks_a})
    b = (torch.full((3, 5, 3), 2.0), {"labels": torch.tensor([1, 2]), "masks": masks_b})
    nested, (ta, tb) = collate_fn([a, b], pad_multiple=4)
    assert nested.tensors.shape == (2, 3, 8, 8) and nested.mask.shape == (2, 8, 8)
    assert not nested.mask[0, :4, :6].any() and nested.mask[0, 4:].all() and nested.mask[0, :, 6:].all()
    assert not nested.mask[1, :5, :3].any() and nested.mask[1, 5:].all() and nested.mask[1, :, 3:].all()
    assert nested.tensors[0, :, :4, :6].eq(1).all() and nested.tensors[1, :, :5, :3].eq(2).all()
    assert nested.tensors.sum() == 3 * 4 * 6 + 2 * 3 * 5 * 3      # nothing but zeros elsewhere
    # every target's masks now cover the batch canvas, top-left aligned, no pixel added
    assert ta["masks"].shape == (1, 8, 8) and tb["masks"].shape == (2, 8, 8)
    assert torch.equal(ta["masks"][:, :4, :6], masks_a) and int(ta["masks"].sum()) == 1
    assert torch.equal(tb["masks"][:, :5, :3], masks_b) and int(tb["masks"].sum()) == 2 * 5 * 3
    assert a[1]["masks"] is masks_a                # the dataset's targets are untouched


def test_build_coco_dataset_from_config(tmp_path):
    from devis_core.data.synthetic import make_synthetic_coco

    make_synthetic_coco(str(tmp_path), num_images=(2, 1), size=(32, 48), objects=(1, 2))
    cfg = get_cfg_defaults()
    cfg.DATASETS.DATA_PATH = str(tmp_path)
    cfg.DATASETS.TRAIN_DATASET = "synthetic_coco_train"
    cfg.DATASETS.VAL_DATASET = "synthetic_coco_val"
    cfg.MODEL.MASK_ON = True
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 200
    val, num_classes = build_coco_dataset(cfg, "val")
    assert num_classes == 6
    img, t = val[0]
    assert img.shape[1:] == (64, 96) and t["masks"].shape[1:] == (64, 96)
    assert ((t["labels"] >= 0) & (t["labels"] < 6)).all()
    cfg.DATASETS.TRAIN_DATASET = "yt_vis_train_19"
    with pytest.raises(DatasetError):
        build_coco_dataset(cfg, "train")
