"""YouTube-VIS annotation index on hand-made files: the three segmentation encodings and the error messages."""

import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from devis_core.data.ytvis_format import (
    DatasetError,
    decode_segmentation,
    load_ytvis,
    mask_to_box,
    rle_string_to_counts,
)

H, W = 5, 7
# Column-major runs: pixels 7, 8, 12, 13, 17, 18 -> rows 2-3 of columns 1-3.
UNCOMPRESSED = {"size": [H, W], "counts": [7, 2, 3, 2, 3, 2, 16]}
UNCOMPRESSED_MASK = np.zeros((H, W), bool)
UNCOMPRESSED_MASK[2:4, 1:4] = True
# Rectangle (1, 1)-(4, 3): pycocotools fills pixels whose centres lie inside -> rows 1-2, columns 1-3.
POLYGON = [[1, 1, 4, 1, 4, 3, 1, 3]]
POLYGON_MASK = np.zeros((H, W), bool)
POLYGON_MASK[1:3, 1:4] = True


def _write_dataset(tmp_path, annotations=None, videos=None):
    frames = tmp_path / "JPEGImages" / "vid"
    frames.mkdir(parents=True)
    for t in range(3):
        Image.fromarray(np.full((H, W, 3), 40 * t, np.uint8)).save(frames / f"{t:05d}.jpg", quality=95)
    square = np.zeros((H, W), np.uint8)
    square[0:2, 5:7] = 1
    compressed = mask_utils.encode(np.asfortranarray(square))
    compressed = {"size": [H, W], "counts": compressed["counts"].decode()}
    data = {
        "videos": videos or [{"id": 4, "width": W, "height": H, "length": 3,
                              "file_names": [f"vid/{t:05d}.jpg" for t in range(3)]}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": annotations if annotations is not None else [
            {"id": 10, "video_id": 4, "category_id": 2, "iscrowd": 0,
             "segmentations": [UNCOMPRESSED, None, POLYGON], "bboxes": [None, None, [1.0, 1.0, 3.0, 2.0]],
             "areas": [None, None, 6.0]},
            {"id": 11, "video_id": 4, "category_id": 1, "iscrowd": 0,
             "segmentations": [compressed, compressed, None], "bboxes": [[5, 0, 2, 2], [5, 0, 2, 2], None],
             "areas": [4, 4, None]},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return str(path), str(tmp_path / "JPEGImages")


def test_rle_string_parser_matches_hand_counted_runs():
    # rows 1-2 of columns 2-4 in a 5x7 mask, column-major: 11 off, then (2 on, 3 off) x3, 12 off.
    mask = np.zeros((H, W), np.uint8)
    mask[1:3, 2:5] = 1
    encoded = mask_utils.encode(np.asfortranarray(mask))["counts"].decode()
    assert rle_string_to_counts(encoded) == [11, 2, 3, 2, 3, 2, 12]
    assert rle_string_to_counts("") == []
    with pytest.raises(ValueError, match="alphabet"):
        rle_string_to_counts("1 2")


def test_decode_all_three_encodings():
    np.testing.assert_array_equal(decode_segmentation(UNCOMPRESSED, H, W), UNCOMPRESSED_MASK)
    np.testing.assert_array_equal(decode_segmentation(POLYGON, H, W), POLYGON_MASK)
    rle = mask_utils.encode(np.asfortranarray(UNCOMPRESSED_MASK.astype(np.uint8)))
    compressed = {"size": [H, W], "counts": rle["counts"].decode()}
    np.testing.assert_array_equal(decode_segmentation(compressed, H, W), UNCOMPRESSED_MASK)
    with pytest.raises(ValueError, match="differs from the video size"):
        decode_segmentation(UNCOMPRESSED, H + 1, W)
    with pytest.raises(ValueError, match="sum to 35, expected 36"):
        decode_segmentation({"size": [6, 6], "counts": UNCOMPRESSED["counts"]}, 6, 6)
    with pytest.raises(ValueError, match="polygon"):
        decode_segmentation([[1, 2, 3]], H, W)


def test_mask_to_box_uses_coco_width_convention():
    assert mask_to_box(UNCOMPRESSED_MASK) == (1.0, 2.0, 3.0, 2.0)
    assert mask_to_box(np.zeros((H, W), bool)) == (0.0, 0.0, 0.0, 0.0)


def test_index_on_hand_made_file(tmp_path):
    ann_file, image_root = _write_dataset(tmp_path)
    index = load_ytvis(ann_file, image_root)
    assert index.video_ids() == [4] and index.num_frames(4) == 3
    assert index.categories == {1: "a", 2: "b"}
    assert [a["id"] for a in index.annotations(4)] == [10, 11]
    assert index.load_frame(4, 2).shape == (H, W, 3)
    assert index.frame_path(4, 1).endswith("JPEGImages/vid/00001.jpg")

    first = index.instances(4, 0)
    assert [i.ann_id for i in first] == [10, 11]
    np.testing.assert_array_equal(first[0].mask, UNCOMPRESSED_MASK)
    assert first[0].box == (1.0, 2.0, 3.0, 2.0)  # bbox null -> from the mask
    assert first[0].area == 6.0  # area null -> mask pixels
    assert first[1].box == (5.0, 0.0, 2.0, 2.0) and first[1].area == 4.0 and first[1].mask.sum() == 4
    assert [i.ann_id for i in index.instances(4, 1)] == [11]
    third = index.instances(4, 2)
    assert [i.ann_id for i in third] == [10] and third[0].category_id == 2
    np.testing.assert_array_equal(third[0].mask, POLYGON_MASK)

    with pytest.raises(IndexError, match="frame index 3"):
        index.frame_path(4, 3)
    with pytest.raises(DatasetError, match="video id 5"):
        index.num_frames(5)


def test_annotations_may_be_null_on_test_splits(tmp_path):
    ann_file, image_root = _write_dataset(tmp_path)
    data = json.loads(open(ann_file).read())
    data["annotations"] = None
    open(ann_file, "w").write(json.dumps(data))
    index = load_ytvis(ann_file, image_root)
    assert index.annotations(4) == [] and index.instances(4, 0) == []


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["annotations"][0].update(video_id=9), r"annotation 10: field 'video_id' refers to unknown video 9"),
    (lambda d: d["annotations"][1].update(category_id=7), r"annotation 11: field 'category_id' .* unknown category 7"),
    (lambda d: d["annotations"][1]["segmentations"].pop(), r"annotation 11: field 'segmentations' has 2 entries"),
    (lambda d: d["annotations"][1].update(id=10), r"annotation 10: field 'id' is duplicated"),
    (lambda d: d["videos"][0].update(width="7"), r"video 4: field 'width' must be int, got str"),
    (lambda d: d["videos"][0].update(length=4), r"video 4: field 'length' is 4"),
    (lambda d: d["videos"][0].pop("file_names"), r"video 4: required field 'file_names' is missing"),
    (lambda d: d.pop("videos"), r"top level: required field 'videos' is missing"),
])
def test_load_errors_name_file_record_and_field(tmp_path, mutate, expected):
    ann_file, image_root = _write_dataset(tmp_path)
    data = json.loads(open(ann_file).read())
    mutate(data)
    open(ann_file, "w").write(json.dumps(data))
    with pytest.raises(DatasetError, match=expected) as info:
        load_ytvis(ann_file, image_root)
    assert ann_file in str(info.value)


def test_bad_json_and_bad_rle_are_reported(tmp_path):
    ann_file, image_root = _write_dataset(tmp_path)
    open(ann_file, "w").write('{"videos": [')
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_ytvis(ann_file, image_root)
    with pytest.raises(DatasetError, match="not found"):
        load_ytvis(str(tmp_path / "nope.json"), image_root)

    ann_file, image_root = _write_dataset(tmp_path / "b")
    data = json.loads(open(ann_file).read())
    data["annotations"][0]["segmentations"][0] = {"size": [H, W + 1], "counts": [36]}
    open(ann_file, "w").write(json.dumps(data))
    index = load_ytvis(ann_file, image_root)  # masks are decoded lazily
    with pytest.raises(DatasetError, match=r"annotation 10 \(video 4\): segmentations\[0\]: RLE size"):
        index.instances(4, 0)


def test_rle_decoding_inverts_pycocotools_encoding_on_random_masks():
    rng = np.random.default_rng(0)
    for trial in range(30):
        h, w = rng.integers(1, 40, size=2)
        mask = rng.random((h, w)) < rng.random()
        if trial == 0:
            mask[:] = True  # a mask starting with object pixels opens with a zero-length background run
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        compressed = {"size": [int(h), int(w)], "counts": rle["counts"].decode()}
        np.testing.assert_array_equal(decode_segmentation(compressed, int(h), int(w)), mask)
        runs = rle_string_to_counts(compressed["counts"])
        assert sum(runs) == h * w
        uncompressed = {"size": [int(h), int(w)], "counts": runs}
        np.testing.assert_array_equal(decode_segmentation(uncompressed, int(h), int(w)), mask)
