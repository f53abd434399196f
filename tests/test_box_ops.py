"""Box geometry on hand-computed cases: conversions, IoU and the epsilon-regularised GIoU."""
import math

import pytest
import torch

from devis_core import box_ops

EPS = 1e-6


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_conversions_hand_values_and_round_trip():
    cxcywh = t([[0.5, 0.4, 0.2, 0.6]])
    xyxy = box_ops.box_cxcywh_to_xyxy(cxcywh)
    assert torch.allclose(xyxy, t([[0.4, 0.1, 0.6, 0.7]]), atol=1e-15)
    assert torch.allclose(box_ops.box_xyxy_to_cxcywh(xyxy), cxcywh, atol=1e-15)
    xywh = t([[10.0, 20.0, 5.0, 8.0]])
    assert torch.equal(box_ops.box_xywh_to_xyxy(xywh), t([[10.0, 20.0, 15.0, 28.0]]))
    assert torch.equal(box_ops.box_xyxy_to_xywh(box_ops.box_xywh_to_xyxy(xywh)), xywh)
    assert box_ops.box_area(t([[1.0, 2.0, 4.0, 7.0]])).item() == 15.0


@pytest.mark.parametrize("b1,b2,inter,union,encl", [
    ([0, 0, 2, 2], [0, 0, 2, 2], 4.0, 4.0, 4.0),      # identical
    ([0, 0, 2, 2], [1, 1, 3, 3], 1.0, 7.0, 9.0),      # partial overlap
    ([0, 0, 1, 1], [2, 0, 3, 1], 0.0, 2.0, 3.0),      # disjoint, side by side
    ([0, 0, 4, 4], [1, 1, 2, 2], 1.0, 16.0, 16.0),    # nested
])
def test_giou_eps_hand_cases(b1, b2, inter, union, encl):
    giou = box_ops.generalized_box_iou(t(b1), t(b2)).item()
    expected = (inter + EPS) / (union + EPS) - ((encl - union) + EPS) / (encl + EPS)
    assert giou == pytest.approx(expected, rel=1e-14, abs=1e-15)
    iou = box_ops.box_iou(t(b1), t(b2)).item()
    assert iou == pytest.approx((inter + EPS) / (union + EPS), rel=1e-14)
    # eps = 0 is stock GIoU: IoU − (C − U)/C
    stock = box_ops.generalized_box_iou(t(b1), t(b2), eps=0.0).item()
    assert stock == pytest.approx(inter / union - (encl - union) / encl, rel=1e-14, abs=1e-15)


def test_giou_eps_differs_from_stock_by_the_regulariser():
    # identical boxes: stock GIoU is exactly 1, the regularised one 1 − eps/(C + eps)
    b = t([0.0, 0.0, 2.0, 2.0])
    assert box_ops.generalized_box_iou(b, b, eps=0.0).item() == 1.0
    assert box_ops.generalized_box_iou(b, b).item() == pytest.approx(1 - EPS / (4 + EPS), rel=1e-15)


def test_giou_eps_is_finite_for_filler_boxes():
    # absent frames carry w = h = 1e-6 filler boxes; two coincident fillers would be 0/0 without eps
    filler = box_ops.box_cxcywh_to_xyxy(t([0.5, 0.5, 1e-6, 1e-6]))
    g = box_ops.generalized_box_iou(filler, filler)
    area = 1e-12
    assert torch.isfinite(g)
    assert g.item() == pytest.approx((area + EPS) / (area + EPS) - EPS / (area + EPS), rel=1e-9)
    real = box_ops.box_cxcywh_to_xyxy(t([0.2, 0.2, 0.1, 0.1]))
    assert torch.isfinite(box_ops.generalized_box_iou(filler, real))


def test_pairwise_matches_elementwise_and_symmetry():
    a = t([[0, 0, 2, 2], [1, 1, 3, 3], [0, 0, 1, 1]])
    b = t([[0, 0, 1, 1], [2, 0, 3, 1]])
    m = box_ops.pairwise_generalized_box_iou(a, b)
    assert m.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            assert m[i, j].item() == box_ops.generalized_box_iou(a[i], b[j]).item()
    assert torch.allclose(box_ops.pairwise_generalized_box_iou(b, a), m.t(), rtol=0, atol=1e-15)
    assert box_ops.pairwise_box_iou(a, b).shape == (3, 2)
    assert (m <= 1).all() and (m >= -1).all()


def test_inverted_or_nan_box_is_refused_with_its_index():
    good = t([[0, 0, 1, 1], [0, 0, 1, 1]])
    bad = t([[0, 0, 1, 1], [0.5, 0, 0.2, 1]])
    with pytest.raises(ValueError, match=r"boxes2: box at index \[1\]"):
        box_ops.generalized_box_iou(good, bad)
    nan = t([[0, 0, 1, 1], [math.nan, 0, 1, 1]])
    with pytest.raises(ValueError, match="boxes1"):
        box_ops.box_iou(nan, good)


def test_masks_to_boxes_official_pixel_convention():
    m = torch.zeros(2, 5, 6, dtype=torch.bool)
    m[0, 1:4, 2:5] = True       # rows 1..3, cols 2..4
    boxes = box_ops.masks_to_boxes(m)
    assert boxes[0].tolist() == [2.0, 1.0, 4.0, 3.0]   # x1/y1 = last pixel index, not extent
    assert boxes[1].tolist() == [0.0, 0.0, 0.0, 0.0]   # empty mask
    assert box_ops.masks_to_boxes(torch.zeros(0, 3, 3, dtype=torch.bool)).shape == (0, 4)
