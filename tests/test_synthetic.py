"""Synthetic VIS / COCO generator: layout, determinism, annotation correctness and promised scene properties."""

import hashlib
import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image

from devis_core.data.checker import check_coco, check_ytvis
from devis_core.data.synthetic import (
    MIN_VISIBLE_PIXELS,
    SHAPES,
    ObjectTrack,
    Scene,
    make_synthetic_coco,
    make_synthetic_vis,
    plan_split,
    render_scene,
    scene_annotations,
    shape_mask,
    synthetic_categories,
)
from devis_core.data.ytvis_format import decode_segmentation, load_ytvis

VIS = dict(num_videos=(5, 3), frames=(6, 10), size=(64, 96), num_categories=6, objects=(3, 4), seed=0)
COCO = dict(num_images=(6, 3), size=(64, 96), num_categories=6, objects=(2, 4), seed=0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_synthetic_vis(str(root), **VIS), make_synthetic_coco(str(root), **COCO)


def _digest_tree(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _load(path):
    with open(path) as fh:
        return json.load(fh)


def test_layout_is_the_official_ytvis21_and_coco_one(dataset):
    vis, coco = dataset
    root = vis["root"]
    for split in ("train", "valid"):
        assert vis[f"{split}_ann_file"] == os.path.join(root, split, "instances.json")
        assert vis[f"{split}_image_root"] == os.path.join(root, split, "JPEGImages")
        data = _load(vis[f"{split}_ann_file"])
        assert len(data["videos"]) == VIS["num_videos"][split == "valid"]
        for video in data["videos"]:
            assert VIS["frames"][0] <= video["length"] == len(video["file_names"]) <= VIS["frames"][1]
            for name in video["file_names"]:
                video_dir, frame = name.split("/")
                assert frame.endswith(".jpg")
                assert os.path.isfile(os.path.join(root, split, "JPEGImages", video_dir, frame))
    for split, count in (("train", 6), ("val", 3)):
        assert coco[f"{split}_ann_file"] == os.path.join(coco["root"], "annotations", f"instances_{split}2017.json")
        data = _load(coco[f"{split}_ann_file"])
        assert [im["id"] for im in data["images"]] == list(range(1, count + 1))
        for im in data["images"]:
            assert os.path.isfile(os.path.join(coco["root"], f"{split}2017", im["file_name"]))


def test_same_seed_gives_byte_identical_files_and_other_seed_differs(dataset, tmp_path):
    vis, coco = dataset
    again_vis = make_synthetic_vis(str(tmp_path / "a"), **VIS)
    again_coco = make_synthetic_coco(str(tmp_path / "a"), **COCO)
    first = _digest_tree(vis["root"])
    assert len(first) > 40
    assert _digest_tree(again_vis["root"]) == first
    assert _digest_tree(again_coco["root"]) == _digest_tree(coco["root"])

    other = make_synthetic_vis(str(tmp_path / "b"), **{**VIS, "seed": 1})
    other_digest = _digest_tree(other["root"])
    assert other_digest["train/instances.json"] != first["train/instances.json"]
    shared = set(other_digest) & set(first)
    frames = [k for k in shared if k.endswith(".jpg")]
    assert frames and all(other_digest[k] != first[k] for k in frames)
    other_coco = make_synthetic_coco(str(tmp_path / "b"), **{**COCO, "seed": 1})
    assert _load(other_coco["val_ann_file"]) != _load(coco["val_ann_file"])


def test_rerun_is_a_noop_and_new_settings_regenerate(tmp_path):
    small = dict(num_videos=(3, 1), frames=(3, 4), size=(32, 48), objects=(1, 2), seed=3)
    paths = make_synthetic_vis(str(tmp_path), **small)
    old = 1_000_000_000_000_000_000
    os.utime(paths["train_ann_file"], ns=(old, old))
    assert make_synthetic_vis(str(tmp_path), **small) == paths
    assert os.stat(paths["train_ann_file"]).st_mtime_ns == old  # not rewritten

    make_synthetic_vis(str(tmp_path), **{**small, "num_videos": (2, 1)})
    assert os.stat(paths["train_ann_file"]).st_mtime_ns != old
    assert sorted(os.listdir(paths["train_image_root"])) == ["train_0000", "train_0001"]  # stale video removed
    assert _load(paths["manifest"])["num_videos"] == [2, 1]

    # An interrupted run (no completion marker) is redone even with the same settings.
    os.remove(os.path.join(paths["root"], ".complete"))
    os.utime(paths["train_ann_file"], ns=(old, old))
    make_synthetic_vis(str(tmp_path), **{**small, "num_videos": (2, 1)})
    assert os.stat(paths["train_ann_file"]).st_mtime_ns != old
    assert not [f for f in os.listdir(paths["root"]) if ".tmp-" in f]


def test_refuses_to_overwrite_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "synthetic_vis").mkdir()
    (tmp_path / "synthetic_vis" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="synthetic_manifest.json"):
        make_synthetic_vis(str(tmp_path), num_videos=(1, 1), frames=(2, 2), size=(32, 32))
    assert (tmp_path / "synthetic_vis" / "mine.txt").read_text() == "user data"


def test_bad_options_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="num_categories"):
        make_synthetic_vis(str(tmp_path), num_categories=9)
    with pytest.raises(ValueError, match="frames"):
        make_synthetic_vis(str(tmp_path), frames=(5, 3))
    with pytest.raises(ValueError, match="size"):
        make_synthetic_coco(str(tmp_path), size=(8, 64))
    with pytest.raises(ValueError, match="seed"):
        make_synthetic_vis(str(tmp_path), seed=-1)


def test_checker_finds_no_problem(dataset):
    vis, coco = dataset
    for split in ("train", "valid"):
        assert check_ytvis(vis[f"{split}_ann_file"], vis[f"{split}_image_root"]) == []
    for split in ("train", "val"):
        assert check_coco(coco[f"{split}_ann_file"], coco[f"{split}_image_root"]) == []


def test_categories_are_stable_and_several_are_used(dataset):
    vis, coco = dataset
    expected = [{"id": i + 1, "name": n, "supercategory": "shape"}
                for i, n in enumerate(["disc", "square", "triangle", "star", "ring", "cross"])]
    assert _load(vis["train_ann_file"])["categories"] == expected
    assert _load(coco["train_ann_file"])["categories"] == expected
    used = {a["category_id"] for a in _load(vis["train_ann_file"])["annotations"]}
    assert len(used) >= 5 and used <= set(range(1, 7))


def test_masks_boxes_and_areas_agree(dataset):
    vis, _ = dataset
    nulls = partial = 0
    for split in ("train", "valid"):
        data = _load(vis[f"{split}_ann_file"])
        videos = {v["id"]: v for v in data["videos"]}
        for ann in data["annotations"]:
            video = videos[ann["video_id"]]
            H, W = video["height"], video["width"]
            assert (H, W) == VIS["size"]
            assert len(ann["segmentations"]) == len(ann["bboxes"]) == len(ann["areas"]) == video["length"]
            present = [s is not None for s in ann["segmentations"]]
            nulls += present.count(False)
            partial += (not all(present)) and any(present)
            for seg, box, area in zip(ann["segmentations"], ann["bboxes"], ann["areas"]):
                if seg is None:
                    assert box is None and area is None
                    continue
                mask = decode_segmentation(seg, H, W)
                assert mask.shape == (H, W) and seg["size"] == [H, W]
                ys, xs = np.nonzero(mask)
                assert box == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                assert area == mask.sum() >= MIN_VISIBLE_PIXELS
    assert nulls > 0 and partial > 0  # objects enter/leave or vanish behind others


def test_annotations_are_the_visible_part_of_the_rendered_scene(dataset):
    """Re-plan the train split: each mask is the shape minus every object drawn later (nearer)."""
    vis, _ = dataset
    data = _load(vis["train_ann_file"])
    index = load_ytvis(vis["train_ann_file"], vis["train_image_root"])
    scenes = plan_split("train", VIS["num_videos"][0], VIS["frames"], VIS["size"], VIS["num_categories"],
                        VIS["objects"], VIS["seed"])
    anns = iter(data["annotations"])
    occluded = scaled = 0
    for vid, scene in enumerate(scenes, start=1):
        frames, visible, amodal = render_scene(scene)
        for n in range(len(scene.objects)):
            nearer = amodal[n + 1:].any(axis=0) if n + 1 < len(scene.objects) else np.zeros_like(amodal[n])
            np.testing.assert_array_equal(visible[n], amodal[n] & ~nearer)
            # occluded: a real part of the shape (inside the frame) is hidden by a nearer object
            occluded += int(((amodal[n] & nearer).sum(axis=(1, 2)) >= 10).sum())
        for obj in scene.objects:
            scaled += obj.radii.max() / obj.radii.min() > 1.3
        kept = [n for n in range(len(scene.objects)) if (visible[n].sum(axis=(1, 2)) >= MIN_VISIBLE_PIXELS).any()]
        for n in kept:
            ann = next(anns)
            assert ann["video_id"] == vid and ann["category_id"] == scene.objects[n].category_id
            for t, seg in enumerate(ann["segmentations"]):
                if visible[n, t].sum() < MIN_VISIBLE_PIXELS:
                    assert seg is None
                else:
                    np.testing.assert_array_equal(decode_segmentation(seg, *VIS["size"]), visible[n, t])
        # JPEG is lossy but must stay close to the rendered pixels
        diff = np.abs(index.load_frame(vid, 0).astype(int) - frames[0].astype(int))
        assert diff.mean() < 6
    assert next(anns, None) is None
    assert occluded >= 3 and scaled >= 3


def test_hand_made_scene_occlusion_and_null_rules():
    """A disc behind a square: covered at t=1, a 6-pixel sliver of the square at t=2, square inside at t=3."""
    H, W, T = 32, 48, 4
    zeros = np.zeros(T)
    disc = ObjectTrack(1, np.tile([24.0, 16.0], (T, 1)), np.full(T, 8.0), zeros)
    square = ObjectTrack(2, np.array([[100.0, 100.0], [24.0, 16.0], [-2.0, 16.0], [24.0, 16.0]]),
                         np.array([4.0, 16.0, 4.0, 4.0]), zeros)  # half side = 0.75 r
    outside = ObjectTrack(3, np.tile([-50.0, -50.0], (T, 1)), np.full(T, 5.0), zeros)
    scene = Scene(H, W, T, np.array([[100, 100, 100], [120, 120, 120]], np.float32),
                  np.array([[0.1, 0.0, 0.0, 1.0]]), np.array([1.0, 0.0]), np.zeros((H, W), np.float32),
                  [disc, square, outside])
    frames, visible, amodal = render_scene(scene)
    assert visible[1, 2].sum() == 6 and visible[1, 3].sum() == 36 and visible[0, 1].sum() == 0
    records = scene_annotations(scene, visible, video_id=9, first_id=5)
    assert [(r["id"], r["video_id"], r["category_id"]) for r in records] == [(5, 9, 1), (6, 9, 2)]
    d, q = records
    assert [s is None for s in d["segmentations"]] == [False, True, False, False]
    assert [s is None for s in q["segmentations"]] == [True, False, True, False]
    assert q["bboxes"][2] is None and q["areas"][2] is None
    assert q["bboxes"][3] == [21.0, 13.0, 6.0, 6.0] and q["areas"][3] == 36.0
    assert d["areas"][3] == d["areas"][0] - 36  # the square sits inside the disc at t=3
    hole = decode_segmentation(d["segmentations"][3], H, W)
    assert not hole[13:19, 21:27].any() and hole[12, 24] and hole[19, 24]
    assert (frames[1, 16, 24] != frames[0, 16, 24]).any()  # the square's colour replaced the disc's


def test_background_moves_and_objects_move(dataset):
    scene = plan_split("valid", 1, (6, 6), (64, 96), 6, (2, 2), 5)[0]
    frames, _, _ = render_scene(scene)
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 3
    assert all(np.linalg.norm(o.centers[-1] - o.centers[0]) > 1 for o in scene.objects)
    assert frames[0].std() > 5  # textured, not flat


def test_shapes_have_the_expected_area_and_differ():
    r = 40.0
    yy, xx = np.mgrid[-50:50, -50:50] + 0.5
    u, v = xx / r, yy / r
    masks = {s: shape_mask(s, u, v) for s in SHAPES}
    assert abs(masks["disc"].sum() - np.pi * r ** 2) / (np.pi * r ** 2) < 0.01
    assert masks["square"].sum() == (2 * 0.75 * r) ** 2
    assert abs(masks["ring"].sum() - np.pi * r ** 2 * (1 - 0.55 ** 2)) / masks["ring"].sum() < 0.02
    assert abs(masks["ellipse"].sum() - np.pi * r * r * 0.5) / masks["ellipse"].sum() < 0.02
    # regular hexagon of circumradius r: (3 sqrt(3) / 2) r^2; triangle: (3 sqrt(3) / 4) r^2
    assert abs(masks["hexagon"].sum() - 1.5 * np.sqrt(3) * r * r) / masks["hexagon"].sum() < 0.02
    assert abs(masks["triangle"].sum() - 0.75 * np.sqrt(3) * r * r) / masks["triangle"].sum() < 0.02
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.85, (a, b, iou)
    assert synthetic_categories(2) == [{"id": 1, "name": "disc", "supercategory": "shape"},
                                       {"id": 2, "name": "square", "supercategory": "shape"}]


def test_videoindex_round_trip(dataset):
    vis, _ = dataset
    data = _load(vis["valid_ann_file"])
    index = load_ytvis(vis["valid_ann_file"], vis["valid_image_root"])
    assert index.video_ids() == [v["id"] for v in data["videos"]] == [1, 2, 3]
    assert index.categories == {c["id"]: c["name"] for c in data["categories"]}
    assert index.videos == data["videos"]
    for video in data["videos"]:
        vid = video["id"]
        assert index.num_frames(vid) == video["length"]
        assert index.annotations(vid) == [a for a in data["annotations"] if a["video_id"] == vid]
        for t in range(video["length"]):
            path = index.frame_path(vid, t)
            assert path == os.path.join(vis["valid_image_root"], video["file_names"][t])
            frame = index.load_frame(vid, t)
            assert frame.shape == (64, 96, 3) and frame.dtype == np.uint8
            with Image.open(path) as img:
                np.testing.assert_array_equal(frame, np.asarray(img.convert("RGB")))
            insts = index.instances(vid, t)
            expected = [a for a in index.annotations(vid) if a["segmentations"][t] is not None]
            assert [i.ann_id for i in insts] == [a["id"] for a in expected]
            for inst, ann in zip(insts, expected):
                assert inst.category_id == ann["category_id"] and inst.iscrowd == 0
                assert inst.mask.dtype == bool and inst.mask.shape == (64, 96)
                assert inst.area == inst.mask.sum() == ann["areas"][t]
                assert list(inst.box) == ann["bboxes"][t]


def test_tiny_dataset_is_fast(tmp_path):
    import time

    start = time.perf_counter()
    make_synthetic_vis(str(tmp_path), num_videos=(4, 1), frames=(8, 8), size=(96, 128))
    assert time.perf_counter() - start < 2.0


def test_cli_writes_the_same_dataset_as_the_api(tmp_path, capsys):
    cli_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data_scripts",
                            "make_synthetic_vis.py")
    spec = importlib.util.spec_from_file_location("make_synthetic_vis_cli", cli_path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = ["--videos", "2", "1", "--frames", "3", "4", "--size", "32", "48", "--categories", "4",
            "--objects", "1", "2", "--seed", "5", "--coco", "--images", "2", "1"]
    assert cli.main(["--data-path", str(tmp_path / "cli")] + args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["vis"]["train_ann_file"] == str(tmp_path / "cli" / "synthetic_vis" / "train" / "instances.json")
    api_vis = make_synthetic_vis(str(tmp_path / "api"), num_videos=(2, 1), frames=(3, 4), size=(32, 48),
                                 num_categories=4, objects=(1, 2), seed=5)
    api_coco = make_synthetic_coco(str(tmp_path / "api"), num_images=(2, 1), size=(32, 48), num_categories=4,
                                   objects=(1, 2), seed=5)
    assert _digest_tree(printed["vis"]["root"]) == _digest_tree(api_vis["root"])
    assert _digest_tree(printed["coco"]["root"]) == _digest_tree(api_coco["root"])
