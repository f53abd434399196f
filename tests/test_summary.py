"""Tests for devis_core/data/summary.py on a hand-written annotation file (counts known by construction)."""

import json

import pytest

from devis_core.data.summary import summarize_videos
from devis_core.data.ytvis_format import load_ytvis

RLE = {"size": [4, 6], "counts": "0o0"}  # never decoded by the summary; only null vs not-null matters


def _write(tmp_path, annotations, categories=((1, "disc"), (2, "star"), (3, "ring"))):
    videos = [
        {"id": 7, "width": 6, "height": 4, "length": 3, "file_names": [f"a/{t}.jpg" for t in range(3)]},
        {"id": 9, "width": 6, "height": 4, "length": 5, "file_names": [f"b/{t}.jpg" for t in range(5)]},
        {"id": 11, "width": 8, "height": 2, "length": 2, "file_names": [f"c/{t}.jpg" for t in range(2)]},
    ]
    data = {"videos": videos, "annotations": annotations,
            "categories": [{"id": i, "name": n, "supercategory": "shape"} for i, n in categories]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return load_ytvis(str(path), str(tmp_path))


def _ann(ann_id, video_id, category_id, segs):
    return {"id": ann_id, "video_id": video_id, "category_id": category_id, "segmentations": segs,
            "bboxes": None, "areas": None, "iscrowd": 0}


def test_counts(tmp_path):
    index = _write(tmp_path, [
        _ann(1, 7, 1, [RLE, None, RLE]),                 # disc, 2 masks
        _ann(2, 9, 1, [None, RLE, RLE, RLE, None]),      # disc, 3 masks
        _ann(3, 9, 2, [RLE, RLE, RLE, RLE, RLE]),        # star, 5 masks
        _ann(4, 11, 2, [None, None]),                    # star, never visible
    ])
    s = summarize_videos(index)
    assert (s.num_videos, s.num_frames, s.min_frames, s.max_frames) == (3, 10, 2, 5)
    assert s.frame_sizes == [(2, 8), (4, 6)]
    assert (s.num_instances, s.num_masks) == (4, 10)
    assert [(c.category_id, c.name, c.instances, c.masks) for c in s.categories] == [
        (1, "disc", 2, 5), (2, "star", 2, 5), (3, "ring", 0, 0)]
    text = str(s)
    assert "videos: 3" in text and "frames: 10 (2-5 per video)" in text and "2x8, 4x6" in text
    assert any(line.split() == ["3", "ring", "0", "0"] for line in text.splitlines())


def test_empty_file(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"videos": [], "annotations": None, "categories": [{"id": 1, "name": "disc"}]}))
    s = summarize_videos(load_ytvis(str(path), str(tmp_path)))
    assert (s.num_videos, s.num_frames, s.min_frames, s.max_frames, s.num_instances) == (0, 0, 0, 0, 0)
    assert [(c.name, c.instances) for c in s.categories] == [("disc", 0)]


class _IndexWithStrayCategory:
    """An index whose records were edited after loading: summary must name the offending annotation."""

    ann_file = "edited.json"
    categories = {1: "disc"}
    videos = [{"id": 5, "width": 4, "height": 4, "file_names": ["x/0.jpg"]}]

    def num_frames(self, video_id):
        return 1

    def annotations(self, video_id):
        return [{"id": 42, "video_id": 5, "category_id": 8, "segmentations": [None]}]


def test_unknown_category_names_annotation():
    with pytest.raises(KeyError, match=r"edited.json.*annotation 42.*category_id 8"):
        summarize_videos(_IndexWithStrayCategory())
