"""Hungarian matching: costs against independent scalar formulas, assignments against brute force,
the clip matcher's index layout, and the official matcher indices stored in the parity fixtures."""
import itertools
import math
import os
from pathlib import Path

import pytest
import torch

from devis_core.config import get_cfg_defaults
from devis_core.matcher import (ClipHungarianMatcher, HungarianMatcher, build_matcher, focal_class_cost,
                                l1_box_cost, matching_cost)

ALPHA = 0.25


def parity_file(name):
    """A parity fixture: tests/fixtures/parity, then $DEVIS_PARITY_FIXTURES, then the shared reference."""
    for folder in (Path(__file__).parent / "fixtures" / "parity", os.environ.get("DEVIS_PARITY_FIXTURES"),
                   "/work/shared/parity"):
        if folder and (Path(folder) / name).is_file():
            return Path(folder) / name
    pytest.fail(f"parity fixture {name} not found in tests/fixtures/parity, $DEVIS_PARITY_FIXTURES or "
                f"/work/shared/parity")


def sig(x):
    return 1 / (1 + math.exp(-x))


def ref_class_cost(p):
    pos = ALPHA * (1 - p) ** 2 * -math.log(p + 1e-8)
    neg = (1 - ALPHA) * p ** 2 * -math.log(1 - p + 1e-8)
    return pos - neg


def ref_giou(a, b, eps=1e-6):
    """Scalar GIoU_eps of two cx, cy, w, h boxes, written independently of devis_core."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    iw, ih = max(0.0, min(ax1, bx1) - max(ax0, bx0)), max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    encl = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return (inter + eps) / (union + eps) - ((encl - union) + eps) / (encl + eps)


LOGITS = [[1.0, -2.0], [-0.5, 0.3], [0.2, 0.1]]           # 3 queries, 2 classes
PRED = [[0.5, 0.5, 0.2, 0.2], [0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.1, 0.2]]
LABELS = [1, 0]
TGT = [[0.32, 0.42, 0.2, 0.25], [0.68, 0.62, 0.12, 0.2]]


def hand_cost_matrix(cc, cb, cg):
    out = []
    for q in range(3):
        row = []
        for n in range(2):
            c = ref_class_cost(sig(LOGITS[q][LABELS[n]]))
            l1 = sum(abs(x - y) for x, y in zip(PRED[q], TGT[n]))
            row.append(cb * l1 + cc * c - cg * ref_giou(PRED[q], TGT[n]))
        out.append(row)
    return out


def brute_force(cost):
    q, n = len(cost), len(cost[0])
    best = min(itertools.permutations(range(q), n), key=lambda rows: sum(cost[r][j] for j, r in enumerate(rows)))
    pairs = sorted((r, j) for j, r in enumerate(best))
    return [r for r, _ in pairs], [j for _, j in pairs]


def image_inputs():
    outputs = {"pred_logits": torch.tensor([LOGITS], dtype=torch.float64),
               "pred_boxes": torch.tensor([PRED], dtype=torch.float64)}
    targets = [{"labels": torch.tensor(LABELS), "boxes": torch.tensor(TGT, dtype=torch.float64)}]
    return outputs, targets


def test_focal_class_cost_hand_value():
    prob = torch.tensor([[[0.3, 0.9]]], dtype=torch.float64)   # T=1, Q=1, K=2
    cost = focal_class_cost(prob, torch.tensor([[1], [0]]))
    assert cost.shape == (1, 2)
    assert cost[0, 0].item() == pytest.approx(ref_class_cost(0.9), rel=1e-14)
    assert cost[0, 1].item() == pytest.approx(ref_class_cost(0.3), rel=1e-14)


def test_image_cost_matrix_matches_hand_computation():
    outputs, targets = image_inputs()
    cost = matching_cost(outputs["pred_logits"][0].sigmoid()[None], outputs["pred_boxes"][0][None],
                         targets[0]["labels"][:, None], targets[0]["boxes"][:, None], 2.0, 5.0, 2.0)
    expected = torch.tensor(hand_cost_matrix(2.0, 5.0, 2.0), dtype=torch.float64)
    assert torch.allclose(cost, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cc,cb,cg", [(2.0, 5.0, 2.0), (0.0, 1.0, 0.0), (1.0, 0.0, 3.0), (10.0, 0.1, 0.0)])
def test_image_assignment_is_optimal_on_hand_matrix(cc, cb, cg):
    outputs, targets = image_inputs()
    (rows, cols), = HungarianMatcher(cc, cb, cg)(outputs, targets)
    exp_rows, exp_cols = brute_force(hand_cost_matrix(cc, cb, cg))
    assert rows.tolist() == exp_rows and cols.tolist() == exp_cols
    assert rows.dtype == torch.int64 and cols.dtype == torch.int64


def test_assignment_beats_greedy():
    # L1-only costs (cx differs): q0 = 0.5, q1 = 0.65; t0 = 0.55, t1 = 0.4
    # -> [[0.05, 0.10], [0.10, 0.25]]: greedy takes (0, 0) then (1, 1) = 0.30; optimum (0, 1), (1, 0) = 0.20
    pred = torch.tensor([[[0.5, 0.5, 0.1, 0.1], [0.65, 0.5, 0.1, 0.1]]], dtype=torch.float64)
    outputs = {"pred_logits": torch.zeros(1, 2, 1, dtype=torch.float64), "pred_boxes": pred}
    tgt_boxes = torch.tensor([[0.55, 0.5, 0.1, 0.1], [0.4, 0.5, 0.1, 0.1]], dtype=torch.float64)
    (rows, cols), = HungarianMatcher(0.0, 1.0, 0.0)(outputs, [{"labels": torch.tensor([0, 0]), "boxes": tgt_boxes}])
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]


def test_image_matcher_batch_and_empty_targets():
    outputs, targets = image_inputs()
    outputs = {k: torch.cat([v, v]) for k, v in outputs.items()}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4, dtype=torch.float64)}
    indices = HungarianMatcher()(outputs, [targets[0], empty])
    assert len(indices) == 2
    assert indices[1][0].numel() == 0 and indices[1][1].numel() == 0
    assert len(indices[0][0]) == 2


def test_matcher_refuses_nan_and_batch_mismatch():
    outputs, targets = image_inputs()
    outputs["pred_logits"][0, 1, 0] = math.nan
    with pytest.raises(ValueError, match="image 0.*NaN"):
        HungarianMatcher()(outputs, targets)
    with pytest.raises(ValueError, match="2 target dicts"):
        HungarianMatcher()(image_inputs()[0], targets * 2)


def test_l1_cost_sum_vs_mean_reduction():
    pred = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]], dtype=torch.float64)
    tgt = torch.tensor([[[0.2, 0.4, 0.6, 0.8]]], dtype=torch.float64)
    assert l1_box_cost(pred, tgt, "sum").item() == pytest.approx(1.0, rel=1e-14)
    assert l1_box_cost(pred, tgt, "mean").item() == pytest.approx(0.25, rel=1e-14)
    with pytest.raises(ValueError, match="coord_reduction"):
        l1_box_cost(pred, tgt, "max")


def clip_case():
    """T=2 frames, N_q=2 slots, 2 instances; instance 1 absent on frame 1 (filler box)."""
    logits = torch.tensor([[[2.0, -1.0], [-1.0, 1.5]],      # frame 0: slots 0, 1
                           [[1.5, -0.5], [0.0, 0.5]]], dtype=torch.float64)   # frame 1
    boxes = torch.tensor([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.2, 0.3]],
                          [[0.35, 0.3, 0.2, 0.2], [0.5, 0.5, 0.3, 0.3]]], dtype=torch.float64)
    outputs = {"pred_logits": logits.reshape(1, 4, 2), "pred_boxes": boxes.reshape(1, 4, 4)}
    tgt_boxes = torch.tensor([[0.72, 0.6, 0.2, 0.3], [0.68, 0.62, 0.2, 0.3],       # instance 0, t=0,1
                              [0.31, 0.3, 0.2, 0.2], [0.31, 0.3, 1e-6, 1e-6]],     # instance 1, t=1 absent
                             dtype=torch.float64)
    targets = [{"labels": torch.tensor([1, 1, 0, 0]), "boxes": tgt_boxes, "valid": torch.tensor([1, 1, 1, 0])}]
    return logits, boxes, outputs, targets


def test_clip_cost_averages_over_frames_including_absent_ones():
    logits, boxes, outputs, targets = clip_case()
    tb = targets[0]["boxes"].view(2, 2, 4)
    labels = targets[0]["labels"].view(2, 2)
    cost = matching_cost(logits.sigmoid(), boxes, labels, tb, 1.0, 5.0, 2.0, l1_coord_reduction="mean")
    for i in range(2):
        for n in range(2):
            c = sum(ref_class_cost(sig(logits[t, i, labels[n, t]].item())) for t in range(2)) / 2
            l1 = sum(abs(boxes[t, i, k].item() - tb[n, t, k].item()) for t in range(2) for k in range(4)) / 8
            g = sum(ref_giou(boxes[t, i].tolist(), tb[n, t].tolist()) for t in range(2)) / 2
            assert cost[i, n].item() == pytest.approx(1.0 * c + 5.0 * l1 - 2.0 * g, rel=1e-12)


def test_clip_matcher_index_layout():
    _, _, outputs, targets = clip_case()
    (pred_idx, tgt_idx), = ClipHungarianMatcher(num_frames=2, cost_class=1.0)(outputs, targets)
    # slot 0 follows instance 1 (boxes near 0.3), slot 1 instance 0: pred t·N_q + i, target n·T + t
    assert pred_idx.tolist() == [0, 2, 1, 3]
    assert tgt_idx.tolist() == [2, 3, 0, 1]
    assert targets[0]["valid"][tgt_idx].tolist() == [1, 0, 1, 1]


def test_clip_matcher_empty_clip_and_bad_shapes():
    _, _, outputs, _ = clip_case()
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4, dtype=torch.float64),
              "valid": torch.zeros(0, dtype=torch.int64)}]
    (p, t), = ClipHungarianMatcher(num_frames=2)(outputs, empty)
    assert p.numel() == 0 and t.numel() == 0
    with pytest.raises(ValueError, match="not a multiple of num_frames=3"):
        ClipHungarianMatcher(num_frames=3)(outputs, empty)
    bad = [{"labels": torch.zeros(3, dtype=torch.int64), "boxes": torch.zeros(3, 4, dtype=torch.float64)}]
    with pytest.raises(ValueError, match="3 target entries"):
        ClipHungarianMatcher(num_frames=2)(outputs, bad)


def test_build_matcher_reads_config():
    cfg = get_cfg_defaults()
    cfg.MODEL.MATCHER.CLASS_COST = 3.0
    m = build_matcher(cfg)
    assert isinstance(m, HungarianMatcher) and m.cost_class == 3.0 and m.cost_bbox == 5.0
    cfg.DATASETS.TYPE = "vis"
    cfg.MODEL.DEVIS.NUM_FRAMES = 4
    cfg.MODEL.MATCHER.USE_SUM_L1_DISTANCE = True
    m = build_matcher(cfg)
    assert isinstance(m, ClipHungarianMatcher) and m.num_frames == 4 and m.use_sum_l1


def test_parity_maskhead_matcher_indices():
    d = torch.load(parity_file("maskhead_public.pt"), weights_only=True)
    e = d["expected"]
    outputs = {"pred_logits": e["pred_logits"][-1], "pred_boxes": e["pred_boxes"][-1]}
    indices = HungarianMatcher(2.0, 5.0, 2.0)(outputs, d["targets"])
    assert len(indices) == len(d["matcher_indices"]) == 2
    for (p, t), (ep, et) in zip(indices, d["matcher_indices"]):
        assert torch.equal(p, ep) and torch.equal(t, et)


def test_parity_devis_clip_matcher_indices():
    d = torch.load(parity_file("devis_public.pt"), weights_only=True)
    e = d["expected"]
    outputs = {"pred_logits": e["pred_logits"][-1], "pred_boxes": e["pred_boxes"][-1]}
    (p, t), = ClipHungarianMatcher(num_frames=4, cost_class=1.0)(outputs, d["targets"])
    ep, et, ev = d["matcher_indices"][0]
    assert torch.equal(p, ep) and torch.equal(t, et)
    assert torch.equal(d["targets"][0]["valid"][t].bool(), ev)


# -- several decoder layers in one call ---------------------------------------------------------------
def _random_layers(d_len, b, q, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"pred_logits": torch.randn(b, q, k, generator=g, dtype=torch.float64),
             "pred_boxes": 0.2 + 0.6 * torch.rand(b, q, 4, generator=g, dtype=torch.float64)} for _ in range(d_len)]


def _count_transfers(monkeypatch):
    import devis_core.matcher as matcher_module
    calls = []
    real = matcher_module._to_host

    def counting(costs):
        calls.append(len(costs))
        return real(costs)
    monkeypatch.setattr(matcher_module, "_to_host", counting)
    return calls


def test_match_layers_equals_one_call_per_layer_with_one_transfer(monkeypatch):
    from devis_core.matcher import match_layers
    g = torch.Generator().manual_seed(1)
    # clip matcher: T=3 frames, N_q=4 slots, two clips (one without instances), 3 layers
    clip_layers = _random_layers(3, 2, 12, 5)
    boxes = 0.2 + 0.6 * torch.rand(6, 4, generator=g, dtype=torch.float64)
    clips = [{"labels": torch.tensor([1, 1, 1, 4, 4, 4]), "boxes": boxes},
             {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4, dtype=torch.float64)}]
    image_layers = _random_layers(3, 2, 6, 5, seed=2)
    images = [{"labels": torch.tensor([0, 3]), "boxes": boxes[:2]}, {"labels": torch.tensor([2]), "boxes": boxes[2:3]}]
    for matcher, layers, targets in ((ClipHungarianMatcher(num_frames=3), clip_layers, clips),
                                     (HungarianMatcher(), image_layers, images)):
        one_by_one = [matcher(o, targets) for o in layers]
        calls = _count_transfers(monkeypatch)
        together = match_layers(matcher, layers, targets)
        assert len(calls) == 1                      # every layer's and clip's costs in one transfer
        assert len(together) == 3
        for a, b in zip(one_by_one, together):
            for (sa, ta), (sb, tb) in zip(a, b):
                assert torch.equal(sa, sb) and torch.equal(ta, tb)
        monkeypatch.undo()
    # the layers are genuinely different problems: not every layer got the same assignment
    assert len({tuple(ind[0][0].tolist()) for ind in together}) > 1 or len(together[0][0][0]) <= 1


def test_batched_costs_equal_per_layer_costs_and_a_plain_callable_is_looped():
    from devis_core.matcher import match_layers, matching_cost
    g = torch.Generator().manual_seed(3)
    prob = torch.rand(4, 3, 5, 6, generator=g, dtype=torch.float64)          # (D, T, Q, K)
    pred = 0.2 + 0.6 * torch.rand(4, 3, 5, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([[0, 0, 0], [5, 5, 5]])
    tgt = 0.2 + 0.6 * torch.rand(2, 3, 4, generator=g, dtype=torch.float64)
    batched = matching_cost(prob, pred, labels, tgt, 1.0, 5.0, 2.0, l1_coord_reduction="mean")
    assert batched.shape == (4, 5, 2)
    for d in range(4):
        assert torch.equal(batched[d], matching_cost(prob[d], pred[d], labels, tgt, 1.0, 5.0, 2.0,
                                                     l1_coord_reduction="mean"))
    seen = []
    assert match_layers(lambda o, t: seen.append(o) or "ok", [{"a": 1}, {"a": 2}], []) == ["ok", "ok"]
    assert seen == [{"a": 1}, {"a": 2}]


def test_match_layers_names_the_layer_with_a_nan():
    layers = _random_layers(2, 1, 4, 3)
    layers[1]["pred_boxes"][0, 2, 0] = math.nan
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]], dtype=torch.float64)}]
    with pytest.raises(ValueError, match="image 0, layer entry 1: the matching cost contains NaN"):
        HungarianMatcher().match_layers(layers, targets)
