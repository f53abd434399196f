"""Dataset registry: the official names of spec §8.2, the synthetic names, user datasets and resolution."""

import json
import os

import pytest

from devis_core.config import get_cfg_defaults
from devis_core.data import registry
from devis_core.data.registry import (
    DatasetSpec,
    UnknownDatasetError,
    build_datasets,
    get_dataset_spec,
    list_datasets,
    register_dataset,
    resolve_dataset,
)
from devis_core.data.synthetic import make_synthetic_coco, make_synthetic_vis
from devis_core.data.ytvis_format import DatasetError

# Spec §8.2 (official vis.py / coco.py builders and docs/INSTALL.md), written out by hand.
OFFICIAL = {
    "train": ("coco", "COCO/train2017", "COCO/annotations/instances_train2017.json", 91),
    "val": ("coco", "COCO/val2017", "COCO/annotations/instances_val2017.json", 91),
    "yt_vis_train_19": ("vis", "Youtube_VIS-2019/train/JPEGImages", "Youtube_VIS-2019/train/train.json", 40),
    "yt_vis_val_19": ("vis", "Youtube_VIS-2019/valid/JPEGImages", "Youtube_VIS-2019/valid/valid.json", 40),
    "yt_vis_train_21": ("vis", "Youtube_VIS-2021/train/JPEGImages", "Youtube_VIS-2021/train/instances.json", 40),
    "yt_vis_val_21": ("vis", "Youtube_VIS-2021/valid/JPEGImages", "Youtube_VIS-2021/valid/instances.json", 40),
    "yt_vis_train_21_wo_2975_2359": ("vis", "Youtube_VIS-2021/train/JPEGImages",
                                     "Youtube_VIS-2021/train/instances_wo_2975_2359.json", 40),
    "ovis_train": ("vis", "OVIS/train", "OVIS/annotations_train.json", 25),
    "ovis_val": ("vis", "OVIS/valid", "OVIS/annotations_valid.json", 25),
    "yt_vis_val_long": ("vis", "Youtube_VIS-long/valid/JPEGImages", "Youtube_VIS-long/valid/instances.json", 40),
    "mini_train": ("vis", "Youtube_VIS/train/JPEGImages", "Youtube_VIS/train/mini_train.json", 40),
    "mini_val": ("vis", "Youtube_VIS/valid/JPEGImages", "Youtube_VIS/valid/mini_valid.json", 40),
}
SYNTHETIC = {
    "synthetic_vis_train": ("vis", "synthetic_vis/train/JPEGImages", "synthetic_vis/train/instances.json"),
    "synthetic_vis_val": ("vis", "synthetic_vis/valid/JPEGImages", "synthetic_vis/valid/instances.json"),
    "synthetic_coco_train": ("coco", "synthetic_coco/train2017", "synthetic_coco/annotations/instances_train2017.json"),
    "synthetic_coco_val": ("coco", "synthetic_coco/val2017", "synthetic_coco/annotations/instances_val2017.json"),
}


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_official_names_paths_and_class_counts():
    for name, (kind, images, ann, classes) in OFFICIAL.items():
        assert get_dataset_spec(name) == DatasetSpec(name, kind, images, ann, classes)
    for name, (kind, images, ann) in SYNTHETIC.items():
        assert get_dataset_spec(name) == DatasetSpec(name, kind, images, ann, None)
    assert list_datasets() == sorted(set(OFFICIAL) | set(SYNTHETIC))


def test_unknown_name_suggests_the_closest():
    with pytest.raises(UnknownDatasetError) as info:
        get_dataset_spec("yt_vis_train_2l")
    assert "'yt_vis_train_21'" in str(info.value) and "did you mean" in str(info.value)
    assert isinstance(info.value, KeyError)
    with pytest.raises(KeyError, match="known names: mini_train"):
        get_dataset_spec("qqqqqqqqqqqqqqqqqqqqqqqqq")


def test_resolve_official_name_reads_nothing(tmp_path):
    os.makedirs(tmp_path / "OVIS" / "valid")
    (tmp_path / "OVIS" / "annotations_valid.json").write_text("not even json")  # the count is fixed: 25
    kind, images, ann, classes = resolve_dataset(str(tmp_path), "ovis_val")
    assert (kind, classes) == ("vis", 25)
    assert images == str(tmp_path / "OVIS" / "valid") and ann == str(tmp_path / "OVIS" / "annotations_valid.json")


def test_resolve_missing_paths_names_dataset_and_path(tmp_path):
    with pytest.raises(DatasetError,
                       match=r"dataset 'yt_vis_val_21': image folder .*Youtube_VIS-2021/valid/JPEGImages"):
        resolve_dataset(str(tmp_path), "yt_vis_val_21")
    os.makedirs(tmp_path / "Youtube_VIS-2021" / "valid" / "JPEGImages")
    with pytest.raises(DatasetError, match=r"annotation file .*Youtube_VIS-2021/valid/instances.json"):
        resolve_dataset(str(tmp_path), "yt_vis_val_21")


def test_resolve_synthetic_reads_class_count_from_file(tmp_path):
    vis = make_synthetic_vis(str(tmp_path), num_videos=(1, 1), frames=(2, 2), size=(32, 32), num_categories=5)
    coco = make_synthetic_coco(str(tmp_path), num_images=(1, 1), size=(32, 32), num_categories=3)
    assert resolve_dataset(str(tmp_path), "synthetic_vis_val") == (
        "vis", vis["valid_image_root"], vis["valid_ann_file"], 5)
    assert resolve_dataset(str(tmp_path), "synthetic_vis_train")[1:] == (
        vis["train_image_root"], vis["train_ann_file"], 5)
    assert resolve_dataset(str(tmp_path), "synthetic_coco_train") == (
        "coco", coco["train_image_root"], coco["train_ann_file"], 3)

    # the count is the largest id (labels are id - 1), not the number of categories
    with open(coco["val_ann_file"]) as fh:
        data = json.load(fh)
    data["categories"] = [{"id": 2, "name": "b"}, {"id": 7, "name": "g"}]
    with open(coco["val_ann_file"], "w") as fh:
        json.dump(data, fh)
    assert resolve_dataset(str(tmp_path), "synthetic_coco_val")[3] == 7
    data["categories"] = [{"id": "7", "name": "g"}]
    with open(coco["val_ann_file"], "w") as fh:
        json.dump(data, fh)
    with pytest.raises(DatasetError, match=r"instances_val2017.json: categories\[0\]: field 'id'"):
        resolve_dataset(str(tmp_path), "synthetic_coco_val")


def test_register_user_dataset(tmp_path, clean_registry):
    os.makedirs(tmp_path / "mine" / "frames")
    (tmp_path / "mine" / "ann.json").write_text("{}")
    spec = DatasetSpec("my_vis", "vis", "mine/frames", "mine/ann.json", 3)
    register_dataset(spec)
    assert "my_vis" in list_datasets() and get_dataset_spec("my_vis") is spec
    assert resolve_dataset(str(tmp_path), "my_vis") == (
        "vis", str(tmp_path / "mine" / "frames"), str(tmp_path / "mine" / "ann.json"), 3)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(DatasetSpec("my_vis", "vis", "x", "y.json", 2))
    register_dataset(DatasetSpec("my_vis", "vis", "x", "y.json", 2), overwrite=True)
    assert get_dataset_spec("my_vis").num_classes == 2
    with pytest.raises(ValueError, match="built in"):
        register_dataset(DatasetSpec("ovis_train", "vis", "x", "y.json", 2), overwrite=True)
    with pytest.raises(TypeError):
        register_dataset(("name", "vis", "x", "y.json", 2))


def test_spec_validation():
    with pytest.raises(ValueError, match="kind must be 'vis' or 'coco'"):
        DatasetSpec("d", "video", "x", "y.json")
    with pytest.raises(ValueError, match="image_root must be relative"):
        DatasetSpec("d", "vis", "/abs/x", "y.json")
    with pytest.raises(ValueError, match="num_classes"):
        DatasetSpec("d", "vis", "x", "y.json", 0)


def test_build_datasets_from_config(tmp_path):
    make_synthetic_vis(str(tmp_path), num_videos=(1, 1), frames=(2, 2), size=(32, 32), num_categories=4)
    cfg = get_cfg_defaults()
    cfg.DATASETS.DATA_PATH = str(tmp_path)
    cfg.DATASETS.TRAIN_DATASET = "synthetic_vis_train"
    cfg.DATASETS.VAL_DATASET = "synthetic_vis_val"
    out = build_datasets(cfg)
    assert out["train"][0] == out["val"][0] == "vis" and out["train"][3] == out["val"][3] == 4
    assert out["val"][2] == str(tmp_path / "synthetic_vis" / "valid" / "instances.json")
