"""COCO evaluation on tiny hand-made cases whose AP can be worked out by hand."""
import json

import numpy as np
import pytest
import torch

from devis_core.coco_eval import METRIC_NAMES, CocoEvaluator, detections_to_coco

H = W = 100


def rect_mask(x0, y0, x1, y1):
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def poly(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


@pytest.fixture()
def gt_file(tmp_path):
    """Two images; image 1 holds a 40×40 box of category 1, image 2 a 30×20 box of category 2 and a
    second 40×40 box of category 1."""
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "segmentation": poly(10, 10, 50, 50)},
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [20, 30, 30, 20], "segmentation": poly(20, 30, 50, 50)},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [55, 55, 40, 40], "segmentation": poly(55, 55, 95, 95)},
    ]
    for a in anns:
        a["area"] = a["bbox"][2] * a["bbox"][3]
        a["iscrowd"] = 0
    data = {"images": [{"id": i, "file_name": f"{i}.jpg", "height": H, "width": W} for i in (1, 2)],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], "annotations": anns}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(data))
    return str(path)


def pred(scores, labels, boxes, masks=None):
    out = {"scores": torch.tensor(scores), "labels": torch.tensor(labels, dtype=torch.int64),
           "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)}
    out["masks"] = torch.from_numpy(np.stack(masks) if masks else np.zeros((0, H, W), bool))
    return out


def perfect():
    return {1: pred([0.9], [0], [[10, 10, 50, 50]], [rect_mask(10, 10, 50, 50)]),
            2: pred([0.8, 0.7], [1, 0], [[20, 30, 50, 50], [55, 55, 95, 95]],
                    [rect_mask(20, 30, 50, 50), rect_mask(55, 55, 95, 95)])}


def test_perfect_predictions_give_ap_one(gt_file):
    ev = CocoEvaluator(gt_file)
    ev.process(perfect())
    res = ev.evaluate()
    assert set(res) == {"bbox", "segm"}
    for t in ("bbox", "segm"):
        assert list(res[t]) == list(METRIC_NAMES)
        for k in ("AP", "AP50", "AP75", "APm", "AR1", "AR10", "AR100"):
            assert res[t][k] == pytest.approx(1.0, abs=1e-9), (t, k)
        assert res[t]["APl"] == -1.0     # no large object in the ground truth


def test_false_positive_ranked_first_and_a_missed_object(gt_file):
    """Category 2 detected perfectly (AP 1). Category 1: a false positive (score 0.95) ranked above
    the one true positive; the other object is missed. Precision after the TP is 1/2 at recall 1/2,
    so the 101-point interpolated AP is 51·0.5/101 at every IoU threshold; mean over the two
    categories: (1 + 25.5/101) / 2."""
    ev = CocoEvaluator(gt_file, iou_types=("bbox",))
    ev.process({1: pred([0.95, 0.9], [0, 0], [[60, 60, 90, 90], [10, 10, 50, 50]]),
                2: pred([0.8], [1], [[20, 30, 50, 50]])})
    res = ev.evaluate()["bbox"]
    expected = (1 + 25.5 / 101) / 2
    assert res["AP"] == pytest.approx(expected, abs=1e-9)
    assert res["AP50"] == pytest.approx(expected, abs=1e-9)
    assert res["AR100"] == pytest.approx((1 + 0.5) / 2, abs=1e-9)


def test_iou_between_thresholds(gt_file):
    """Only image 1 evaluated; its box predicted as 40×60 instead of 40×40: IoU = 1600/2400 = 2/3, a
    true positive for the IoU thresholds 0.50, 0.55, 0.60, 0.65 only: AP50 = 1, AP75 = 0, AP = 0.4.
    Category 2 has no ground truth on image 1, so it is left out of the mean."""
    ev = CocoEvaluator(gt_file, iou_types=("bbox",))
    ev.process({1: pred([0.9], [0], [[10, 10, 50, 70]])})
    res = ev.evaluate()["bbox"]
    assert res["AP50"] == pytest.approx(1.0, abs=1e-9)
    assert res["AP75"] == pytest.approx(0.0, abs=1e-12)
    assert res["AP"] == pytest.approx(0.4, abs=1e-9)


def test_no_detections_and_reset(gt_file):
    ev = CocoEvaluator(gt_file)
    ev.process({1: pred([], [], []), 2: pred([], [], [])})
    res = ev.evaluate()
    assert res["bbox"]["AP"] == 0.0 and res["segm"]["AR100"] == 0.0
    ev.reset()
    ev.process(perfect())
    assert ev.evaluate()["bbox"]["AP"] == pytest.approx(1.0, abs=1e-9)
    ev.reset()
    with pytest.raises(ValueError, match="no image was processed"):
        ev.evaluate()


def test_conversion_and_bad_input(gt_file):
    entries = detections_to_coco(7, pred([0.5], [2], [[1, 2, 11, 22]], [rect_mask(0, 0, 3, 3)]), ("bbox", "segm"))
    assert entries["bbox"] == [{"image_id": 7, "category_id": 3, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5}]
    assert entries["segm"][0]["category_id"] == 3 and entries["segm"][0]["segmentation"]["size"] == [H, W]
    ev = CocoEvaluator(gt_file)
    with pytest.raises(KeyError, match="image id 99"):
        ev.process({99: pred([], [], [])})
    with pytest.raises(ValueError, match="'keypoints'"):
        CocoEvaluator(gt_file, iou_types=("keypoints",))
