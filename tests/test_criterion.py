"""Losses on hand-checked cases (independent scalar formulas), the aux weighting scheme, and the
official losses of the parity fixtures recomputed from their stored decoder outputs."""
import math
import os
from pathlib import Path

import pytest
import torch

from devis_core.config import load_config
from devis_core.criterion import (SetCriterion, build_criterion, build_weight_dict, dice_loss,
                                  sigmoid_focal_loss)
from devis_core.matcher import ClipHungarianMatcher, HungarianMatcher

ALPHA = 0.25


def find_parity(name):
    """A parity fixture: tests/fixtures/parity, then $DEVIS_PARITY_FIXTURES, then the shared reference;
    None if absent."""
    for folder in (Path(__file__).parent / "fixtures" / "parity", os.environ.get("DEVIS_PARITY_FIXTURES"),
                   "/work/shared/parity"):
        if folder and (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def parity_file(name):
    """Like find_parity, but a missing fixture fails the test."""
    if find_parity(name) is not None:
        return find_parity(name)
    pytest.fail(f"parity fixture {name} not found in tests/fixtures/parity, $DEVIS_PARITY_FIXTURES or "
                f"/work/shared/parity")


def sig(x):
    return 1 / (1 + math.exp(-x))


def ref_focal(x, y):
    """Scalar sigmoid focal loss, alpha 0.25, gamma 2."""
    p = sig(x)
    ce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
    p_t = p if y else 1 - p
    a_t = ALPHA if y else 1 - ALPHA
    return a_t * (1 - p_t) ** 2 * ce


def ref_giou(a, b, eps=1e-6):
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    encl = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return (inter + eps) / (union + eps) - ((encl - union) + eps) / (encl + eps)


class NoMatcher:
    """Fails the test if the criterion runs the matcher although indices were given."""

    def __call__(self, outputs, targets):
        raise AssertionError("matcher called although outputs carry indices")


def f64(x):
    return torch.tensor(x, dtype=torch.float64)


def test_sigmoid_focal_loss_elementwise():
    x = f64([-3.0, -0.5, 0.0, 0.7, 4.0])
    for y in (0.0, 1.0):
        got = sigmoid_focal_loss(x, torch.full_like(x, y))
        for g, xi in zip(got.tolist(), x.tolist()):
            assert g == pytest.approx(ref_focal(xi, y), rel=1e-13)


def test_dice_loss_hand_value():
    # p = 0.5 everywhere, target [1, 1, 0, 0]: 1 - (2·1 + 1) / (2 + 2 + 1) = 0.4, / num_boxes 2
    loss = dice_loss(torch.zeros(1, 4, dtype=torch.float64), f64([[1, 1, 0, 0]]), num_boxes=2)
    assert loss.item() == pytest.approx(0.2, rel=1e-14)


LOGITS = [[0.5, -1.0], [0.0, 2.0]]        # Q = 2 queries, K = 2 classes
PRED = [[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]]
TGT = [0.55, 0.52, 0.3, 0.35]


def test_image_losses_hand_checked():
    outputs = {"pred_logits": f64([LOGITS]), "pred_boxes": f64([PRED]),
               "indices": [(torch.tensor([1]), torch.tensor([0]))]}
    targets = [{"labels": torch.tensor([1]), "boxes": f64([TGT])}]
    losses = SetCriterion(2, NoMatcher(), {}, ("labels", "boxes"))(outputs, targets)
    ce = sum(ref_focal(LOGITS[q][k], 1.0 if (q, k) == (1, 1) else 0.0) for q in range(2) for k in range(2))
    assert losses["loss_ce"].item() == pytest.approx(ce, rel=1e-13)
    assert losses["loss_bbox"].item() == pytest.approx(sum(abs(a - b) for a, b in zip(PRED[1], TGT)), rel=1e-13)
    assert losses["loss_giou"].item() == pytest.approx(1 - ref_giou(PRED[1], TGT), rel=1e-13)
    assert losses["class_error"].item() == 0.0          # argmax of query 1 is class 1
    # the matcher path picks the same pair (query 1 is the obvious match) and gives the same numbers
    del outputs["indices"]
    again = SetCriterion(2, HungarianMatcher(), {}, ("labels", "boxes"))(outputs, targets)
    assert again["loss_ce"].item() == losses["loss_ce"].item()


def test_num_boxes_normaliser_and_empty_image():
    outputs = {"pred_logits": f64([LOGITS, LOGITS]), "pred_boxes": f64([PRED, PRED]),
               "indices": [(torch.tensor([1]), torch.tensor([0])), (torch.tensor([], dtype=torch.int64),) * 2]}
    targets = [{"labels": torch.tensor([1]), "boxes": f64([TGT])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4, dtype=torch.float64)}]
    losses = SetCriterion(2, NoMatcher(), {})(outputs, targets)
    ce_img0 = sum(ref_focal(LOGITS[q][k], 1.0 if (q, k) == (1, 1) else 0.0) for q in range(2) for k in range(2))
    ce_img1 = sum(ref_focal(LOGITS[q][k], 0.0) for q in range(2) for k in range(2))
    assert losses["loss_ce"].item() == pytest.approx(ce_img0 + ce_img1, rel=1e-13)   # num_boxes = 1
    # no target anywhere: num_boxes is clamped to 1 and the box losses are 0
    empty = [targets[1], targets[1]]
    out2 = dict(outputs, indices=[(torch.tensor([], dtype=torch.int64),) * 2] * 2)
    losses = SetCriterion(2, NoMatcher(), {})(out2, empty)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    assert losses["loss_ce"].item() == pytest.approx(2 * ce_img1, rel=1e-13)
    assert losses["class_error"].item() == 100.0


def test_bad_labels_and_indices_are_refused():
    outputs = {"pred_logits": f64([LOGITS]), "pred_boxes": f64([PRED]),
               "indices": [(torch.tensor([1]), torch.tensor([0]))]}
    with pytest.raises(ValueError, match="batch element 0 has target labels \\[5\\]"):
        SetCriterion(2, NoMatcher(), {})(outputs, [{"labels": torch.tensor([5]), "boxes": f64([TGT])}])
    outputs["indices"] = [(torch.tensor([1]), torch.tensor([3]))]
    with pytest.raises(IndexError, match="matched target index 3"):
        SetCriterion(2, NoMatcher(), {})(outputs, [{"labels": torch.tensor([1]), "boxes": f64([TGT])}])


def test_clip_losses_valid_flags_and_filler_boxes():
    """T=2, N_q=1, one instance present on frame 0 only: class positive only on frame 0, boxes
    regressed on both frames (filler box on frame 1), num_boxes = N·T = 2."""
    logits = [[1.0, -0.5], [0.3, 0.8]]          # query t·N_q + 0 for t = 0, 1
    pred = [[0.4, 0.4, 0.2, 0.2], [0.45, 0.4, 0.1, 0.1]]
    tgt = [[0.42, 0.41, 0.2, 0.25], [0.42, 0.41, 1e-6, 1e-6]]
    outputs = {"pred_logits": f64([logits]), "pred_boxes": f64([pred])}
    targets = [{"labels": torch.tensor([0, 0]), "boxes": f64(tgt), "valid": torch.tensor([1, 0])}]
    crit = SetCriterion(2, ClipHungarianMatcher(num_frames=2), {})
    losses = crit(outputs, targets)
    ce = sum(ref_focal(logits[t][k], 1.0 if (t, k) == (0, 0) else 0.0) for t in range(2) for k in range(2)) / 2
    l1 = sum(abs(a - b) for t in range(2) for a, b in zip(pred[t], tgt[t])) / 2
    giou = sum(1 - ref_giou(pred[t], tgt[t]) for t in range(2)) / 2
    assert losses["loss_ce"].item() == pytest.approx(ce, rel=1e-13)
    assert losses["loss_bbox"].item() == pytest.approx(l1, rel=1e-13)
    assert losses["loss_giou"].item() == pytest.approx(giou, rel=1e-12)
    # an instance with no present frame at all: no positives, and (official rule) no box regression
    targets[0]["valid"] = torch.tensor([0, 0])
    losses = crit(outputs, targets)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    ce_neg = sum(ref_focal(logits[t][k], 0.0) for t in range(2) for k in range(2)) / 2
    assert losses["loss_ce"].item() == pytest.approx(ce_neg, rel=1e-13)


def test_mask_losses_with_upsampling_and_padding():
    """Two images 4×6 and 6×4 (padded batch 6×6); constant mask logits stay constant under bilinear
    upsampling, so focal and dice reduce to counts of foreground pixels over the 36 padded pixels."""
    m0 = torch.zeros(1, 4, 6, dtype=torch.bool)
    m0[0, 1:3, 1:4] = True                        # 6 foreground pixels
    m1 = torch.zeros(2, 6, 4, dtype=torch.bool)
    m1[0, :, 0] = True                            # 6 pixels
    m1[1, 0:2, 0:2] = True                        # 4 pixels
    targets = [{"labels": torch.tensor([0]), "boxes": f64([[0.5, 0.5, 0.5, 0.5]]), "masks": m0},
               {"labels": torch.tensor([1, 0]), "boxes": f64([[0.5, 0.5, 0.2, 0.2]] * 2), "masks": m1}]
    consts = [0.7, -1.2, 2.0]                     # order of indices: image 0 pair, image 1 pairs
    outputs = {"pred_logits": torch.zeros(2, 3, 2, dtype=torch.float64),
               "pred_boxes": f64([[[0.5, 0.5, 0.5, 0.5]] * 3] * 2),
               "indices": [(torch.tensor([2]), torch.tensor([0])), (torch.tensor([0, 1]), torch.tensor([1, 0]))],
               "pred_masks": torch.stack([torch.full((3, 3), c, dtype=torch.float64) for c in consts])}
    losses = SetCriterion(2, NoMatcher(), {}, ("labels", "boxes", "masks"))(outputs, targets)
    fg = [6, 4, 6]                                # image 1: query 0 -> target 1 (4 px), query 1 -> target 0 (6 px)
    num_boxes = 3
    focal = sum((k * ref_focal(c, 1) + (36 - k) * ref_focal(c, 0)) / 36 for c, k in zip(consts, fg)) / num_boxes
    dice = sum(1 - (2 * k * sig(c) + 1) / (36 * sig(c) + k + 1) for c, k in zip(consts, fg)) / num_boxes
    assert losses["loss_mask"].item() == pytest.approx(focal, rel=1e-12)
    assert losses["loss_dice"].item() == pytest.approx(dice, rel=1e-12)
    outputs["pred_masks"] = outputs["pred_masks"][:2]
    with pytest.raises(ValueError, match="pred_masks has 2 masks but the matching has 3 pairs"):
        SetCriterion(2, NoMatcher(), {}, ("labels", "boxes", "masks"))(outputs, targets)


def test_aux_layers_get_suffixes_and_their_own_matching():
    layer = {"pred_logits": f64([LOGITS]), "pred_boxes": f64([PRED])}
    outputs = dict(layer, aux_outputs=[dict(layer), dict(layer, pred_logits=f64([LOGITS]) * 2)])
    targets = [{"labels": torch.tensor([1]), "boxes": f64([TGT])}]
    losses = SetCriterion(2, HungarianMatcher(), {})(outputs, targets)
    assert set(losses) == {"loss_ce", "class_error", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0",
                           "loss_giou_0", "loss_ce_1", "loss_bbox_1", "loss_giou_1"}
    assert losses["loss_ce_0"].item() == losses["loss_ce"].item()
    ce_1 = sum(ref_focal(2 * LOGITS[q][k], 1.0 if (q, k) == (1, 1) else 0.0) for q in range(2) for k in range(2))
    assert losses["loss_ce_1"].item() == pytest.approx(ce_1, rel=1e-13)


def test_weight_dict_aux_weighting_coefficients():
    w = build_weight_dict(2.0, 5.0, 2.0, num_decoder_layers=6, aux_loss_weighting=True, mask_on=True,
                          mask_coef=1.0, dice_coef=1.0, mask_aux_layers=[2])
    assert w["loss_ce"] == pytest.approx(2.0 * 15 / 30) and w["loss_bbox"] == pytest.approx(5.0 * 15 / 30)
    for i in range(5):
        assert w[f"loss_ce_{i}"] == pytest.approx(2.0 * (i + 1) / 30, rel=1e-15)
        assert w[f"loss_bbox_{i}"] == pytest.approx(5.0 * (i + 1) / 30, rel=1e-15)
        assert w[f"loss_giou_{i}"] == pytest.approx(2.0 * (i + 1) / 30, rel=1e-15)
    factors = [w["loss_ce"] / 2.0] + [w[f"loss_ce_{i}"] / 2.0 for i in range(5)]
    assert sum(factors) == pytest.approx(1.0, rel=1e-14)
    assert w["loss_mask_2"] == 1.0 and "loss_mask_1" not in w      # mask terms are not re-weighted
    plain = build_weight_dict(2.0, 5.0, 2.0, num_decoder_layers=6)
    assert plain["loss_ce_4"] == 2.0 and "loss_mask" not in plain
    with pytest.raises(ValueError, match="at most 6 decoder layers"):
        build_weight_dict(2.0, 5.0, 2.0, num_decoder_layers=7, aux_loss_weighting=True)
    with pytest.raises(ValueError, match="MASK_AUX_LOSS lists decoder layer 5"):
        build_weight_dict(2.0, 5.0, 2.0, num_decoder_layers=3, mask_on=True, mask_aux_layers=[5])


@pytest.mark.parametrize("fixture", ["maskhead_public.pt", "devis_public.pt"])
def test_weight_dict_equals_fixture_loss_weights(fixture):
    """maskhead: no weighting (ce 2, L1 5, GIoU 2, mask 8/8); devis: 15/30 and 1/30, 2/30 for 3 layers."""
    d = torch.load(parity_file(fixture), weights_only=True)
    cfg = load_config(d["yaml"], d["overrides"])
    crit = build_criterion(cfg, d["num_classes"])
    assert crit.weight_dict == d["loss_weights"]
    assert list(crit.weight_dict) == list(d["loss_weights"])
    assert crit.losses == ("labels", "boxes", "masks")
    stored = {k: torch.tensor(v, dtype=torch.float64) for k, v in d["losses"].items()}
    assert crit.total_loss(stored).item() == pytest.approx(d["loss_total"], rel=1e-12)


def _fixture_outputs(e):
    return {"pred_logits": e["pred_logits"][-1], "pred_boxes": e["pred_boxes"][-1],
            "aux_outputs": [{"pred_logits": e["pred_logits"][i], "pred_boxes": e["pred_boxes"][i]}
                            for i in range(e["pred_logits"].shape[0] - 1)]}


def _assert_losses(ours, stored, keys):
    for k in keys:
        assert ours[k].item() == pytest.approx(stored[k], rel=1e-9, abs=0), k


def test_parity_maskhead_box_and_class_losses_every_layer():
    d = torch.load(parity_file("maskhead_public.pt"), weights_only=True)
    crit = SetCriterion(d["num_classes"], HungarianMatcher(2.0, 5.0, 2.0), d["loss_weights"], ("labels", "boxes"))
    losses = crit(_fixture_outputs(d["expected"]), d["targets"])
    keys = [f"{k}{s}" for s in ("", "_0", "_1") for k in ("loss_ce", "loss_bbox", "loss_giou")]
    _assert_losses(losses, d["losses"], keys + ["class_error"])


def test_parity_devis_clip_losses_including_final_mask_losses():
    """The clip criterion on the stored DeVIS outputs; the final layer's mask logits are in the fixture
    (``mask_logits_all[i, t]`` for slot i, frame t), so its mask losses can be checked too."""
    d = torch.load(parity_file("devis_public.pt"), weights_only=True)
    e = d["expected"]
    matcher = ClipHungarianMatcher(num_frames=4, cost_class=1.0)
    outputs = _fixture_outputs(e)
    indices = matcher({"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}, d["targets"])
    n_q = e["mask_logits_all"].shape[0]
    pred_idx = indices[0][0]
    outputs["indices"] = indices
    outputs["pred_masks"] = e["mask_logits_all"][pred_idx % n_q, pred_idx // n_q]
    crit = SetCriterion(d["num_classes"], matcher, d["loss_weights"], ("labels", "boxes", "masks"))
    losses = crit(outputs, d["targets"])
    keys = [f"{k}{s}" for s in ("", "_0", "_1") for k in ("loss_ce", "loss_bbox", "loss_giou")]
    _assert_losses(losses, d["losses"], keys + ["loss_mask", "loss_dice", "class_error"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_parity_losses_float32_on_cuda():
    """The fixtures' outputs and targets cast to float32 on the GPU (indices from the matcher stay on
    the CPU): same matching, losses within the README's float32 tolerance (1e-5 relative)."""
    dev = torch.device("cuda")
    checked = 0
    for name, matcher, losses in (("maskhead_public.pt", HungarianMatcher(2.0, 5.0, 2.0), ("labels", "boxes")),
                                  ("devis_public.pt", ClipHungarianMatcher(num_frames=4, cost_class=1.0),
                                   ("labels", "boxes", "masks"))):
        if find_parity(name) is None:
            continue  # a device checkout may carry only some of the fixtures
        checked += 1
        d = torch.load(find_parity(name), weights_only=True)
        e = {k: v.to(dev, torch.float32) for k, v in d["expected"].items() if torch.is_tensor(v) and v.is_floating_point()}
        targets = [{k: (v.to(dev, torch.float32) if v.is_floating_point() else v.to(dev))
                    for k, v in t.items() if torch.is_tensor(v)} for t in d["targets"]]
        outputs = _fixture_outputs(e)
        if "masks" in losses:
            indices = matcher({"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}, targets)
            n_q = e["mask_logits_all"].shape[0]
            p = indices[0][0].to(dev)
            outputs["indices"] = indices
            outputs["pred_masks"] = e["mask_logits_all"][p % n_q, p // n_q]
        got = SetCriterion(d["num_classes"], matcher, d["loss_weights"], losses)(outputs, targets)
        keys = [k for k in got if k in d["losses"]]
        assert len(keys) >= 9
        for k in keys:
            assert got[k].device.type == "cuda"
            assert got[k].item() == pytest.approx(d["losses"][k], rel=1e-5), (name, k)
    assert checked >= 1


# -- host bookkeeping of the criterion ------------------------------------------------------------------
def test_pairs_of_every_layer_hand_checked():
    """Two clips-as-images: image 0 has entries (valid 1, 0, 1), image 1 has two entries, none present in
    the match; the index arrays of the class, box and mask losses, per layer, worked out by hand."""
    crit = SetCriterion(3, NoMatcher(), {}, ("labels", "boxes", "masks"))
    masks = [torch.zeros(3, 2, 2, dtype=torch.bool), torch.zeros(2, 2, 2, dtype=torch.bool)]
    targets = [{"labels": torch.tensor([2, 1, 0]), "boxes": f64([TGT] * 3), "valid": torch.tensor([1, 0, 1]),
                "masks": masks[0]},
               {"labels": torch.tensor([1, 1]), "boxes": f64([TGT] * 2), "valid": torch.tensor([0, 0]),
                "masks": masks[1]}]
    tg = crit._prepare_targets(targets, 3)
    assert tg.counts == [3, 2] and tg.offsets == [0, 3]
    assert tg.labels.tolist() == [2, 1, 0, 1, 1] and tg.valid.tolist() == [True, False, True, False, False]
    assert tuple(tg.masks.shape) == (2, 3, 2, 2)
    layer_a = [(torch.tensor([4, 7]), torch.tensor([1, 0])), (torch.tensor([5]), torch.tensor([1]))]
    layer_b = [(torch.tensor([0]), torch.tensor([2])), (torch.tensor([], dtype=torch.int64),) * 2]
    p = crit._pairs(tg, [layer_a, layer_b], torch.device("cpu"))
    # layer a: image 0 pairs (q4 -> entry 1 absent, q7 -> entry 0 present): one positive, both regressed;
    # image 1 pair (q5 -> entry 1 absent): no present entry in that image, so nothing regressed.
    # layer b: image 0 pair (q0 -> entry 2 present): one positive, regressed; image 1: no pair.
    assert (p.num_pos, p.num_reg, p.num_matched) == ([1, 1], [2, 1], [3, 1])
    assert p.pos_layer.tolist() == [0, 1] and p.reg_layer.tolist() == [0, 0, 1]
    assert (p.pos_batch.tolist(), p.pos_query.tolist(), p.pos_label.tolist()) == ([0, 0], [7, 0], [2, 0])
    assert (p.reg_batch.tolist(), p.reg_query.tolist(), p.reg_target.tolist()) == ([0, 0, 0], [4, 7, 0], [1, 0, 2])
    assert p.reg_slot.tolist() == [0, 1, 0]
    assert p.reg_rank.tolist() == [0, 1, 0] and p.reg_mask_row.tolist() == [1, 0, 2]
    assert p.layer_slice("reg_mask_row", 1).tolist() == [2] and p.layer_slice("pos_query", 0).tolist() == [7]


def test_stacked_layer_losses_equal_each_layer_on_its_own():
    """The class and box losses of three decoder layers computed together equal each layer's losses
    computed alone (float64), with different matches and pair counts per layer."""
    g = torch.Generator().manual_seed(0)
    B, Q, K = 2, 5, 3
    targets = [{"labels": torch.tensor([2, 1, 0]), "valid": torch.tensor([1, 0, 1]),
                "boxes": torch.rand(3, 2, generator=g, dtype=torch.float64).mul(0.5).add(0.25).repeat(1, 2)},
               {"labels": torch.tensor([1]), "boxes": f64([TGT])}]
    layers = []
    for perm in ([4, 0, 2], [1, 3, 0], [2, 4, 1]):
        layers.append({"pred_logits": torch.randn(B, Q, K, generator=g, dtype=torch.float64),
                       "pred_boxes": torch.rand(B, Q, 4, generator=g, dtype=torch.float64).mul(0.5).add(0.2),
                       "indices": [(torch.tensor(perm[:3]), torch.tensor([0, 1, 2])),
                                   (torch.tensor(perm[:1]), torch.tensor([0]))]})
    layers[2]["indices"][0] = (torch.tensor([3]), torch.tensor([1]))   # a layer with fewer pairs
    crit = SetCriterion(K, NoMatcher(), {}, ("labels", "boxes"))
    together = crit({**layers[0], "aux_outputs": layers[1:]}, targets)
    for i, layer in enumerate(layers):
        alone = crit(layer, targets)
        suffix = "" if i == 0 else f"_{i - 1}"
        for k in ("loss_ce", "loss_bbox", "loss_giou"):
            torch.testing.assert_close(together[k + suffix], alone[k], rtol=1e-12, atol=1e-15, msg=k + suffix)
    torch.testing.assert_close(together["class_error"], crit(layers[0], targets)["class_error"])
    # by hand: layer 2 (aux index 1) matches image 0 only to entry 1, which is absent, so image 0
    # regresses nothing (the official rule); image 1 regresses q2 -> entry 0; num_boxes = 3 + 1 entries
    l1 = (layers[2]["pred_boxes"][1, 2] - targets[1]["boxes"][0]).abs().sum()
    torch.testing.assert_close(together["loss_bbox_1"], l1 / 4, rtol=1e-12, atol=0)


def test_target_checks_cover_every_entry():
    outputs = {"pred_logits": f64([LOGITS]), "pred_boxes": f64([PRED]),
               "indices": [(torch.tensor([1]), torch.tensor([0]))]}
    # an unmatched entry with a label outside the logits is refused too
    with pytest.raises(ValueError, match="batch element 0 has target labels \\[1, 2\\]"):
        SetCriterion(2, NoMatcher(), {})(outputs, [{"labels": torch.tensor([1, 2]), "boxes": f64([TGT, TGT])}])
    bad = [{"labels": torch.tensor([1, 0]), "boxes": f64([TGT, [0.5, 0.5, -0.1, 0.2]])}]
    with pytest.raises(ValueError, match="batch element 0, target entry 1 has box .*w, h >= 0"):
        SetCriterion(2, NoMatcher(), {})(outputs, bad)
    bad[0]["boxes"][1] = f64([math.nan, 0.5, 0.1, 0.2])
    with pytest.raises(ValueError, match="target entry 1 has box \\[nan"):
        SetCriterion(2, NoMatcher(), {})(outputs, bad)


def test_layers_without_indices_are_matched_in_one_call():
    class CountingMatcher:
        def __init__(self):
            self.calls, self.inner = [], HungarianMatcher()

        def match_layers(self, layers, targets):
            self.calls.append(len(layers))
            return self.inner.match_layers(layers, targets)

    layer = {"pred_logits": f64([LOGITS]), "pred_boxes": f64([PRED])}
    outputs = dict(layer, aux_outputs=[dict(layer), dict(layer, indices=[(torch.tensor([0]), torch.tensor([0]))])])
    m = CountingMatcher()
    losses = SetCriterion(2, m, {})(outputs, [{"labels": torch.tensor([1]), "boxes": f64([TGT])}])
    assert m.calls == [2]                        # final + aux 0 together; aux 1 brought its own indices
    assert losses["loss_bbox_0"].item() == losses["loss_bbox"].item()
    assert losses["loss_bbox_1"].item() == pytest.approx(sum(abs(a - b) for a, b in zip(PRED[0], TGT)), rel=1e-13)
