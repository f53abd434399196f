"""Dataset checker: each kind of defect in a broken copy of the synthetic data is reported with its id and field."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from devis_core.data.checker import Problem, check_coco, check_dataset, check_ytvis
from devis_core.data.synthetic import make_synthetic_coco, make_synthetic_vis

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(REPO, "data_scripts", "check_dataset.py")
SIZE = (48, 64)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    vis = make_synthetic_vis(root, num_videos=(3, 1), frames=(4, 5), size=SIZE, objects=(2, 3), seed=7)
    coco = make_synthetic_coco(root, num_images=(4, 1), size=SIZE, objects=(2, 3), seed=7)
    return vis, coco


def _copy_vis(source, tmp_path):
    vis, _ = source
    split = os.path.dirname(vis["train_ann_file"])
    shutil.copytree(split, tmp_path / "train")
    ann, images = str(tmp_path / "train" / "instances.json"), str(tmp_path / "train" / "JPEGImages")
    with open(ann) as fh:
        return ann, images, json.load(fh)


def _copy_coco(source, tmp_path):
    _, coco = source
    shutil.copytree(coco["train_image_root"], tmp_path / "train2017")
    ann = str(tmp_path / "instances_train2017.json")
    shutil.copy(coco["train_ann_file"], ann)
    with open(ann) as fh:
        return ann, str(tmp_path / "train2017"), json.load(fh)


def _save(path, data):
    with open(path, "w") as fh:
        json.dump(data, fh)


def _keys(problems):
    return {(p.where, p.field) for p in problems}


def _non_null_frame(ann):
    return next(t for t, s in enumerate(ann["segmentations"]) if s is not None)


def test_clean_copy_has_no_problem(source, tmp_path):
    ann, images, _ = _copy_vis(source, tmp_path)
    assert check_ytvis(ann, images) == []
    problems, summary = check_dataset(ann, images)
    assert problems == [] and "OK (ytvis): 3 videos" in summary


def test_missing_frame(source, tmp_path):
    ann, images, data = _copy_vis(source, tmp_path)
    video = data["videos"][1]
    os.remove(os.path.join(images, video["file_names"][2]))
    problems = check_ytvis(ann, images)
    assert _keys(problems) == {(f"video {video['id']}", "file_names[2]")}
    assert "file not found" in problems[0].message and video["file_names"][2] in problems[0].message


def test_wrong_frame_size(source, tmp_path):
    ann, images, data = _copy_vis(source, tmp_path)
    path = os.path.join(images, data["videos"][0]["file_names"][0])
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(path)
    problems = check_ytvis(ann, images)
    assert _keys(problems) == {("video 1", "file_names[0]")}
    assert "12x10" in problems[0].message and "64x48" in problems[0].message


def test_unreadable_frame(source, tmp_path):
    ann, images, data = _copy_vis(source, tmp_path)
    with open(os.path.join(images, data["videos"][2]["file_names"][1]), "wb") as fh:
        fh.write(b"not a jpeg")
    problems = check_ytvis(ann, images)
    assert _keys(problems) == {("video 3", "file_names[1]")} and "not a readable image" in problems[0].message


def test_segmentation_list_too_short(source, tmp_path):
    ann, images, data = _copy_vis(source, tmp_path)
    a = data["annotations"][0]
    a["segmentations"].pop()
    _save(ann, data)
    problems = check_ytvis(ann, images)
    assert _keys(problems) == {(f"annotation {a['id']}", "segmentations")}
    length = data["videos"][a["video_id"] - 1]["length"]
    assert f"has {length - 1} entries" in problems[0].message and f"{length} frames" in problems[0].message


def test_rle_size_mismatch(source, tmp_path):
    ann, images, data = _copy_vis(source, tmp_path)
    a = data["annotations"][1]
    t = _non_null_frame(a)
    a["segmentations"][t]["size"] = [SIZE[0] + 1, SIZE[1]]
    _save(ann, data)
    problems = check_ytvis(ann, images)
    assert _keys(problems) == {(f"annotation {a['id']}", f"segmentations[{t}]")}
    assert "RLE size [49, 64] differs from the video size [48, 64]" in problems[0].message


def test_corrupt_rle_counts_are_reported_not_decoded(source, tmp_path):
    ann, images, data = _copy_vis(source, tmp_path)
    a = data["annotations"][0]
    t = _non_null_frame(a)
    a["segmentations"][t]["counts"] = "0000000000000000;"
    _save(ann, data)
    problems = check_ytvis(ann, images)
    assert _keys(problems) == {(f"annotation {a['id']}", f"segmentations[{t}]")}
    assert "runs sum to" in problems[0].message


def test_unknown_category(source, tmp_path):
    ann, images, data = _copy_vis(source, tmp_path)
    data["annotations"][0]["category_id"] = 99
    _save(ann, data)
    problems = check_ytvis(ann, images)
    assert _keys(problems) == {(f"annotation {data['annotations'][0]['id']}", "category_id")}
    assert "unknown category id 99" in problems[0].message


def test_duplicate_ids(source, tmp_path):
    ann, images, data = _copy_vis(source, tmp_path)
    data["annotations"][1]["id"] = data["annotations"][0]["id"]
    data["videos"].append(dict(data["videos"][1]))
    data["categories"].append({"id": 1, "name": "again"})
    _save(ann, data)
    problems = check_ytvis(ann, images)
    keys = _keys(problems)
    assert (f"annotation {data['annotations'][0]['id']}", "id") in keys
    assert ("video 2", "id") in keys and ("category 1", "id") in keys
    assert len(problems) == 3
    assert all("duplicate" in p.message for p in problems)


def test_bad_field_types(source, tmp_path):
    ann, images, data = _copy_vis(source, tmp_path)
    data["videos"][0]["width"] = "64"
    data["annotations"][0]["iscrowd"] = "0"
    data["annotations"][1]["bboxes"] = {"0": None}
    a2 = data["annotations"][2]
    t = _non_null_frame(a2)
    a2["bboxes"][t] = [1, 2, 3]
    data["categories"][0]["name"] = 5
    _save(ann, data)
    problems = check_ytvis(ann, images)
    a0, a1 = data["annotations"][0]["id"], data["annotations"][1]["id"]
    # width is unusable, so video 1's frames are only checked for existence (no false size errors)
    assert _keys(problems) == {("video 1", "width"), (f"annotation {a0}", "iscrowd"),
                               (f"annotation {a1}", "bboxes"), (f"annotation {a2['id']}", f"bboxes[{t}]"),
                               ("category 1", "name")}


def test_unknown_video_id(source, tmp_path):
    ann, images, data = _copy_vis(source, tmp_path)
    data["annotations"][0]["video_id"] = 77
    _save(ann, data)
    problems = check_ytvis(ann, images)
    assert _keys(problems) == {(f"annotation {data['annotations'][0]['id']}", "video_id")}
    assert "unknown video id 77" in problems[0].message


def test_every_problem_is_listed(source, tmp_path):
    ann, images, data = _copy_vis(source, tmp_path)
    os.remove(os.path.join(images, data["videos"][0]["file_names"][0]))
    os.remove(os.path.join(images, data["videos"][0]["file_names"][1]))
    data["annotations"][0]["category_id"] = 42
    data["annotations"][1]["video_id"] = 42
    del data["videos"][2]["length"]
    _save(ann, data)
    problems = check_ytvis(ann, images)
    assert len(problems) == 5
    assert all(isinstance(p, Problem) and p.file == ann for p in problems)
    text = str(problems[0])
    assert text.startswith(f"{ann}: video 1: file_names[0]: file not found")


def test_invalid_json_and_unknown_format(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"videos": [}')
    problems = check_ytvis(str(bad), str(tmp_path))
    assert len(problems) == 1 and problems[0].field == "json" and "not valid JSON" in problems[0].message
    other = tmp_path / "other.json"
    other.write_text('{"foo": 1}')
    problems, summary = check_dataset(str(other), str(tmp_path))
    assert [(p.where, p.field) for p in problems] == [("top level", "format")] and "1 problem" in summary


def test_coco_defects(source, tmp_path):
    ann, images, data = _copy_coco(source, tmp_path)
    assert check_coco(ann, images) == []
    os.remove(os.path.join(images, data["images"][3]["file_name"]))
    data["annotations"][0]["image_id"] = 50
    data["annotations"][1]["segmentation"]["size"] = [10, 10]
    data["annotations"][2]["id"] = data["annotations"][3]["id"]
    data["annotations"][4]["area"] = -1
    del data["annotations"][5]["bbox"]
    _save(ann, data)
    problems = check_coco(ann, images)
    a = data["annotations"]
    assert _keys(problems) == {("image 4", "file_name"), (f"annotation {a[0]['id']}", "image_id"),
                               (f"annotation {a[1]['id']}", "segmentation"), (f"annotation {a[3]['id']}", "id"),
                               (f"annotation {a[4]['id']}", "area"), (f"annotation {a[5]['id']}", "bbox")}
    assert len(problems) == 6


def _load_cli():
    spec = importlib.util.spec_from_file_location("check_dataset_cli", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_exit_codes_and_output(source, tmp_path, capsys):
    vis, coco = source
    cli = _load_cli()
    assert cli.main([vis["valid_ann_file"], "--images", vis["valid_image_root"]]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "OK (ytvis): 1 videos" in out[0]
    assert cli.main([coco["val_ann_file"], "--images", coco["val_image_root"]]) == 0
    assert "OK (coco): 1 images" in capsys.readouterr().out
    # forcing the wrong format reports the missing fields instead of guessing
    assert cli.main([coco["val_ann_file"], "--images", coco["val_image_root"], "--format", "ytvis"]) == 1
    assert "top level: videos: required field is missing" in capsys.readouterr().out

    ann, images, data = _copy_vis(source, tmp_path)
    data["annotations"][0]["category_id"] = 99
    data["annotations"][1]["video_id"] = 99
    _save(ann, data)
    result = subprocess.run([sys.executable, CLI, ann, "--images", images], capture_output=True, text=True,
                            cwd=str(tmp_path))
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(ann) for line in lines)
    assert "2 problems" in result.stderr
