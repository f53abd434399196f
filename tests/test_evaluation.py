"""Tests of devis_core/evaluation.py (YouTube-VIS / OVIS video AP) and its benchmark case generator."""
from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from devis_core.benchmarks.eval_case import ellipse_rle, make_eval_case
from devis_core.evaluation import (
    STAT_NAMES,
    EvaluationError,
    VideoInstanceEvaluator,
    build_evaluator,
    check_results,
    evaluate_files,
    evaluate_tracks,
    frame_areas,
    load_ground_truth,
    video_iou,
    write_metrics,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "ytvis_eval"


# ----------------------------------------------------------------------------------------------------
# helpers: masks as dense arrays -> RLE with str counts

def rle(mask: np.ndarray) -> dict:
    enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": enc["counts"].decode("ascii")}


def box_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def make_gt(videos, annotations, num_categories=2) -> dict:
    """videos: [(id, h, w, length)]; annotations: [(id, video_id, cat, [mask | None], iscrowd)]."""
    return {
        "videos": [{"id": v, "height": h, "width": w, "length": n} for v, h, w, n in videos],
        "categories": [{"id": k + 1, "name": f"c{k + 1}"} for k in range(num_categories)],
        "annotations": [
            {"id": i, "video_id": v, "category_id": c, "iscrowd": crowd,
             "segmentations": [None if m is None else rle(m) for m in masks],
             "areas": [None if m is None else float(m.sum()) for m in masks]}
            for i, v, c, masks, crowd in annotations],
    }


def pred(video_id, cat, score, masks) -> dict:
    return {"video_id": video_id, "category_id": cat, "score": score,
            "segmentations": [None if m is None else rle(m) for m in masks]}


def approx(value: float):
    # COCOeval's precision is tp / (tp + fp + eps), so a perfect score reads 1 - 2e-16.
    return pytest.approx(value)


def run(gt: dict, results: list) -> dict:
    g = load_ground_truth(gt)
    return evaluate_tracks(g, check_results(results, g))


# ----------------------------------------------------------------------------------------------------
# parity with the official YouTube-VIS API

def _cases():
    dirs = [FIXTURES]
    if os.environ.get("DEVIS_EVAL_FIXTURES"):
        dirs.append(Path(os.environ["DEVIS_EVAL_FIXTURES"]))
    cases = []
    for d in dirs:
        for gt_path in sorted(glob.glob(str(d / "gt_*.json"))):
            n = Path(gt_path).stem[len("gt_"):]
            cases.append(pytest.param(gt_path, str(d / f"results_{n}.json"), str(d / f"expected_{n}.json"),
                                      id=f"{d.name}/{n}"))
    return cases


def test_fixture_cases_present():
    assert len(glob.glob(str(FIXTURES / "gt_*.json"))) >= 3
    for gt_path in glob.glob(str(FIXTURES / "gt_*.json")):
        n = Path(gt_path).stem[3:]
        assert (FIXTURES / f"results_{n}.json").is_file() and (FIXTURES / f"expected_{n}.json").is_file()


@pytest.mark.parametrize("gt_path,results_path,expected_path", _cases())
def test_matches_official_api(gt_path, results_path, expected_path):
    expected = json.loads(Path(expected_path).read_text())["stats"]
    metrics = evaluate_files(gt_path, results_path)
    for name in STAT_NAMES:
        assert abs(metrics[name] - expected[name]) <= 1e-9, (name, metrics[name], expected[name])


# ----------------------------------------------------------------------------------------------------
# video IoU

def test_video_iou_hand_computed():
    h, w = 4, 4
    rows01, row0 = box_mask(h, w, 0, 2, 0, 4), box_mask(h, w, 0, 1, 0, 4)
    two = box_mask(h, w, 3, 4, 0, 2)
    det = [rle(rows01), None, rle(two)]
    g0 = [rle(row0), rle(row0), None]
    g1 = [None, None, rle(two)]
    areas = lambda track: frame_areas(track)  # noqa: E731
    iou = video_iou([det], [g0, g1], np.stack([areas(det)]), np.stack([areas(g0), areas(g1)]))
    # g0: I = 4 (frame 0); U = 8 (frame 0) + 4 (g only, frame 1) + 2 (det only, frame 2) = 14
    # g1: I = 2 (frame 2); U = 8 (det only, frame 0) + 2 (frame 2) = 10
    np.testing.assert_array_equal(iou, [[4 / 14, 2 / 10]])
    # both absent everywhere -> 0, not NaN
    empty = [None, None, None]
    assert video_iou([empty], [empty], np.zeros((1, 3)), np.zeros((1, 3)))[0, 0] == 0.0


def test_video_iou_equals_dense_sums_random():
    rng = np.random.default_rng(3)
    h, w, t, nd, ng = 9, 11, 5, 4, 3

    def track():
        return [None if rng.random() < 0.3 else rng.random((h, w)) < rng.uniform(0.1, 0.7) for _ in range(t)]

    dets, gts = [track() for _ in range(nd)], [track() for _ in range(ng)]
    to_rles = lambda tr: [None if m is None else rle(m) for m in tr]  # noqa: E731
    d_rles, g_rles = [to_rles(d) for d in dets], [to_rles(g) for g in gts]
    got = video_iou(d_rles, g_rles, np.stack([frame_areas(d) for d in d_rles]),
                    np.stack([frame_areas(g) for g in g_rles]))
    zero = np.zeros((h, w), dtype=bool)
    for i, d in enumerate(dets):
        for j, g in enumerate(gts):
            inter = sum(int((a & b).sum()) for a, b in zip(d, g) if a is not None and b is not None)
            union = sum(int(((zero if a is None else a) | (zero if b is None else b)).sum()) for a, b in zip(d, g))
            assert got[i, j] == (inter / union if union else 0.0)


def test_video_iou_bitwise_equal_to_official_merge_arithmetic():
    # The official API sums area(merge(intersect)) and area(merge(union)) frame by frame; the
    # vectorised recovery of intersections from pycocotools.iou must give the very same floats.
    gt, results = make_eval_case(num_videos=2, num_frames=6, size=(90, 160), preds_per_video=12, seed=5)
    g = load_ground_truth(gt)
    dets = check_results(results, g)
    for d in dets:
        d.areas = frame_areas(d.rles)
    checked = 0
    for v in g.videos:
        gts = [x for x in g.tracks if x.video_id == v]
        ds = [x for x in dets if x.video_id == v]
        got = video_iou([d.rles for d in ds], [x.rles for x in gts], np.stack([d.areas for d in ds]),
                        np.stack([x.areas for x in gts]))
        for i, d in enumerate(ds):
            for j, x in enumerate(gts):
                inter = union = 0.0
                for a, b in zip(d.rles, x.rles):
                    if a and b:
                        inter += mask_utils.area(mask_utils.merge([a, b], True))
                        union += mask_utils.area(mask_utils.merge([a, b], False))
                    elif b:
                        union += mask_utils.area(b)
                    elif a:
                        union += mask_utils.area(a)
                assert got[i, j] == (inter / union if union > 0 else 0.0)
                checked += inter > 0
    assert checked >= 3  # some pairs actually overlap


# ----------------------------------------------------------------------------------------------------
# AP / AR on hand-computed cases

H, W = 8, 8
A = box_mask(H, W, 0, 4, 0, 4)      # 16 px
B = box_mask(H, W, 4, 8, 4, 8)      # 16 px, disjoint from A


def test_tp_before_fp_and_fp_before_tp():
    gt = make_gt([(1, H, W, 2)], [(1, 1, 1, [A, A], 0)])
    good = run(gt, [pred(1, 1, 0.9, [A, A]), pred(1, 1, 0.8, [B, B])])
    assert good["AP"] == approx(1.0) and good["AR1"] == 1.0 and good["AR100"] == 1.0
    bad = run(gt, [pred(1, 1, 0.9, [B, B]), pred(1, 1, 0.8, [A, A])])
    # precision at recall 1 is 1/2 and is carried to all 101 recall thresholds
    assert bad["AP"] == approx(0.5)
    assert bad["AR1"] == 0.0 and bad["AR10"] == 1.0


def test_temporal_iou_sets_threshold():
    # det right on frame 0, absent on frame 1 where the GT is present: IoU = 16 / 32 = 0.5,
    # a true positive only at the 0.50 threshold -> AP = 1/10.
    gt = make_gt([(1, H, W, 2)], [(1, 1, 1, [A, A], 0)])
    m = run(gt, [pred(1, 1, 0.9, [A, None])])
    assert m["AP50"] == approx(1.0) and m["AP75"] == 0.0
    assert m["AP"] == approx(0.1)
    assert m["AR100"] == approx(0.1)


def test_crowd_ground_truth_absorbs_detections():
    results = [pred(1, 1, 0.9, [A, A])]
    crowd = run(make_gt([(1, H, W, 2)], [(1, 1, 1, [A, A], 1), (2, 1, 1, [B, B], 0)]), results)
    # det on the crowd region is ignored; the one regular GT is missed -> precision 0 everywhere
    assert crowd["AP"] == 0.0 and crowd["AR100"] == 0.0
    plain = run(make_gt([(1, H, W, 2)], [(1, 1, 1, [A, A], 0), (2, 1, 1, [B, B], 0)]), results)
    # one of two GTs found at rank 1: precision 1 up to recall 0.5 -> 51 of 101 thresholds
    assert plain["AP"] == approx(51 / 101)


def test_area_ranges_use_mean_over_present_frames():
    big = np.ones((140, 140), dtype=bool)            # 19600 px: medium (128^2 <= a <= 256^2)
    gt = make_gt([(1, 140, 140, 2)], [(1, 1, 1, [big, None], 0)])
    m = run(gt, [pred(1, 1, 0.9, [big, None])])
    # averaging the absent frame as 0 would give 9800 px ("small")
    assert m["APm"] == approx(1.0) and m["APs"] == -1.0 and m["APl"] == -1.0
    assert m["ARm"] == 1.0 and m["ARs"] == -1.0


def test_per_category_ap():
    gt = make_gt([(1, H, W, 1)], [(1, 1, 1, [A], 0), (2, 1, 2, [B], 0)], num_categories=3)
    m = run(gt, [pred(1, 1, 0.9, [A]), pred(1, 1, 0.8, [B]),     # class 1: TP, FP -> 1.0
                 pred(1, 2, 0.9, [A]), pred(1, 2, 0.8, [B])])    # class 2: FP, TP -> 0.5
    per = {c["category_id"]: c for c in m["per_category"]}
    assert per[1]["AP"] == approx(1.0) and per[2]["AP"] == approx(0.5)
    assert per[3]["AP"] == -1.0 and per[3]["name"] == "c3"     # no GT: left out of the mean
    assert m["AP"] == approx(0.75)


def test_tied_scores_keep_file_order():
    gt = make_gt([(1, H, W, 1)], [(1, 1, 1, [A], 0)])
    assert run(gt, [pred(1, 1, 0.5, [B]), pred(1, 1, 0.5, [A])])["AP"] == approx(0.5)
    assert run(gt, [pred(1, 1, 0.5, [A]), pred(1, 1, 0.5, [B])])["AP"] == approx(1.0)


def test_max_detections():
    gt = make_gt([(1, H, W, 1)], [(1, 1, 1, [A], 0)])
    results = [pred(1, 1, 0.9 - 0.01 * k, [B]) for k in range(10)] + [pred(1, 1, 0.1, [A])]
    m = run(gt, results)
    assert m["AR1"] == 0.0 and m["AR10"] == 0.0 and m["AR100"] == 1.0
    assert m["AP"] == approx(1 / 11)


def test_perfect_predictions_on_generated_case():
    gt, _ = make_eval_case(num_videos=3, num_frames=5, size=(64, 96), preds_per_video=4, num_categories=3, seed=1)
    results = [{"video_id": a["video_id"], "category_id": a["category_id"], "score": 1.0,
                "segmentations": a["segmentations"]} for a in gt["annotations"]]
    m = run(gt, results)
    assert m["AP"] == approx(1.0) and m["AR100"] == 1.0


# ----------------------------------------------------------------------------------------------------
# malformed input

def _bad_cases():
    good = lambda: pred(1, 1, 0.9, [A, A])  # noqa: E731
    wrong_size = good()
    wrong_size["segmentations"][1] = rle(np.zeros((H + 1, W), dtype=bool))
    nan_score, str_score, no_counts = good(), good(), good()
    nan_score["score"] = float("nan")
    str_score["score"] = "0.9"
    no_counts["segmentations"][0] = {"size": [H, W]}
    short = good()
    short["segmentations"] = short["segmentations"][:1]
    missing = good()
    del missing["score"]
    return [
        ("wrong video", {**good(), "video_id": 7}, ["entry 1", "video_id 7"]),
        ("short list", short, ["entry 1", "video_id 1", "'segmentations'", "2 entries", "got 1"]),
        ("rle size", wrong_size, ["entry 1", "video_id 1", "segmentations[1]", "[9, 8]", "[8, 8]"]),
        ("nan score", nan_score, ["entry 1", "video_id 1", "'score'", "nan"]),
        ("str score", str_score, ["entry 1", "video_id 1", "'score'", "'0.9'"]),
        ("bool score", {**good(), "score": True}, ["entry 1", "'score'"]),
        ("unknown class", {**good(), "category_id": 9}, ["entry 1", "video_id 1", "category_id 9"]),
        ("no counts", no_counts, ["entry 1", "segmentations[0]"]),
        ("missing field", missing, ["entry 1", "'score'"]),
    ]


@pytest.mark.parametrize("label,entry,needles", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_malformed_results_name_the_entry(label, entry, needles):
    gt = load_ground_truth(make_gt([(1, H, W, 2)], [(1, 1, 1, [A, A], 0)]), name="gt.json")
    with pytest.raises(EvaluationError) as info:
        check_results([pred(1, 1, 0.9, [A, A]), entry], gt, source="res.json")
    message = str(info.value)
    assert message.startswith("res.json: ")
    for needle in needles:
        assert needle in message, (needle, message)


def test_results_not_a_list(tmp_path):
    gt_path, res_path = tmp_path / "gt.json", tmp_path / "r.json"
    gt_path.write_text(json.dumps(make_gt([(1, H, W, 1)], [(1, 1, 1, [A], 0)])))
    res_path.write_text(json.dumps({"video_id": 1}))
    with pytest.raises(EvaluationError, match=r"r\.json: expected a JSON list"):
        evaluate_files(str(gt_path), str(res_path))


def test_malformed_ground_truth_names_annotation():
    gt = make_gt([(3, H, W, 2)], [(11, 3, 1, [A, A], 0)])
    gt["annotations"][0]["segmentations"].append(None)
    with pytest.raises(EvaluationError, match=r"gt\.json: annotations\[0\] \(id 11, video 3\).*2 entries.*got 3"):
        load_ground_truth(gt, name="gt.json")
    gt = make_gt([(3, H, W, 2)], [(11, 4, 1, [A, A], 0)])
    with pytest.raises(EvaluationError, match=r"video_id 4 is not in 'videos'"):
        load_ground_truth(gt, name="gt.json")


def test_polygon_ground_truth_is_rasterised():
    gt = make_gt([(1, H, W, 1)], [(1, 1, 1, [A], 0)])
    # square polygon covering pixels [0, 4) x [0, 4); pycocotools' polygon rasterisation gives 16 px
    gt["annotations"][0]["segmentations"] = [[[0, 0, 4, 0, 4, 4, 0, 4]]]
    g = load_ground_truth(gt)
    assert g.tracks[0].areas[0] == mask_utils.area(mask_utils.merge(mask_utils.frPyObjects([[0, 0, 4, 0, 4, 4, 0, 4]], H, W)))
    assert run(gt, [pred(1, 1, 0.9, [mask_utils.decode(g.tracks[0].rles[0]).astype(bool)])])["AP"] == approx(1.0)


# ----------------------------------------------------------------------------------------------------
# evaluator interface, files, command line, config

def _write_case(tmp_path):
    gt = make_gt([(1, H, W, 2), (2, H, W, 1)], [(1, 1, 1, [A, A], 0), (2, 2, 2, [B], 0)])
    results = [pred(1, 1, 0.9, [A, None]), pred(1, 2, 0.5, [B, B]), pred(2, 2, 0.7, [B])]
    gt_path, res_path = tmp_path / "gt.json", tmp_path / "results.json"
    gt_path.write_text(json.dumps(gt))
    res_path.write_text(json.dumps(results))
    return gt, results, str(gt_path), str(res_path)


def test_evaluator_process_per_video_equals_one_call(tmp_path):
    gt, results, gt_path, res_path = _write_case(tmp_path)
    expected = evaluate_files(gt_path, res_path)
    ev = VideoInstanceEvaluator(load_ground_truth(gt_path))
    ev.process([r for r in results if r["video_id"] == 1])
    ev.process([r for r in results if r["video_id"] == 2])
    got = ev.evaluate()
    assert {k: got[k] for k in STAT_NAMES} == {k: expected[k] for k in STAT_NAMES}
    assert expected["AP"] == approx((0.1 + 1.0) / 2)  # class 1: IoU 0.5; class 2: exact
    # entry indices go on counting across process() calls
    with pytest.raises(EvaluationError, match="entry 3:"):
        ev.process([{**results[0], "video_id": 42}])
    ev.reset()
    empty = ev.evaluate()
    assert empty["AP"] == 0.0 and empty["num_predictions"] == 0


def test_command_line_writes_metrics(tmp_path):
    _, _, gt_path, res_path = _write_case(tmp_path)
    out = tmp_path / "sub" / "metrics.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "devis_core.evaluation", "--gt", gt_path, "--results", res_path,
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.550" in proc.stdout
    written = json.loads(out.read_text())
    expected = evaluate_files(gt_path, res_path)
    assert {k: written[k] for k in STAT_NAMES} == {k: expected[k] for k in STAT_NAMES}
    assert [c["category_id"] for c in written["per_category"]] == [1, 2]
    assert os.listdir(out.parent) == ["metrics.json"]  # no temporary left behind

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"video_id": 5, "category_id": 1, "score": 1.0, "segmentations": [None]}]))
    proc = subprocess.run([sys.executable, "-m", "devis_core.evaluation", "--gt", gt_path, "--results", str(bad)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 2 and "entry 0" in proc.stderr and "video_id 5" in proc.stderr


def test_table_is_cocoeval_summary():
    import contextlib
    import io

    from devis_core.evaluation import _VideoCOCOeval, format_metrics

    g = load_ground_truth(str(FIXTURES / "gt_2.json"))
    dets = check_results(json.loads((FIXTURES / "results_2.json").read_text()), g)
    coco_eval, printed = _VideoCOCOeval(g, dets), io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
    with contextlib.redirect_stdout(printed):
        coco_eval.summarize()
    table = format_metrics(evaluate_tracks(g, dets))
    assert table.split("\n\n")[0] == printed.getvalue().rstrip("\n")
    assert " cat3                        3  -1.000  -1.000" in table  # category without GT


def test_write_metrics_replaces_atomically(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("old")
    write_metrics(str(path), {"AP": 0.25})
    assert json.loads(path.read_text()) == {"AP": 0.25} and os.listdir(tmp_path) == ["m.json"]
    with pytest.raises(TypeError):
        write_metrics(str(path), {"AP": object()})
    assert json.loads(path.read_text()) == {"AP": 0.25} and os.listdir(tmp_path) == ["m.json"]


def test_build_evaluator_from_config(tmp_path):
    from devis_core.config import get_cfg_defaults

    gt, _, _, _ = _write_case(tmp_path)
    (tmp_path / "Youtube_VIS" / "valid").mkdir(parents=True)
    (tmp_path / "Youtube_VIS" / "valid" / "mini_valid.json").write_text(json.dumps(gt))
    cfg = get_cfg_defaults()
    cfg.DATASETS.DATA_PATH = str(tmp_path)
    cfg.DATASETS.VAL_DATASET = "mini_val"
    ev = build_evaluator(cfg)
    assert sorted(ev.gt.videos) == [1, 2] and len(ev.gt.tracks) == 2
    cfg.DATASETS.VAL_DATASET = "no_such_split"
    with pytest.raises(EvaluationError, match="no_such_split"):
        build_evaluator(cfg)


# ----------------------------------------------------------------------------------------------------
# benchmark case generator

@pytest.mark.parametrize("cx,cy,rx,ry,h,w", [(10.3, 7.7, 6.2, 4.1, 16, 24), (0.0, 0.0, 9.0, 9.0, 12, 12),
                                             (23.5, 15.5, 30.0, 2.6, 16, 24), (5.0, 40.0, 3.0, 3.0, 16, 24)])
def test_ellipse_rle_matches_dense_ellipse(cx, cy, rx, ry, h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    dense = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1.0
    r, area, bbox = ellipse_rle(cx, cy, rx, ry, h, w)
    if dense.sum() < 12:
        assert r is None and area == 0
        return
    np.testing.assert_array_equal(mask_utils.decode(r).astype(bool), dense)
    assert area == dense.sum() and isinstance(r["counts"], str)
    ys, xs = np.nonzero(dense)
    assert bbox == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]


def test_make_eval_case_is_deterministic_and_well_formed():
    kw = dict(num_videos=3, num_frames=6, size=(48, 80), preds_per_video=7, num_categories=5)
    gt, res = make_eval_case(seed=2, **kw)
    gt2, res2 = make_eval_case(seed=2, **kw)
    _, res3 = make_eval_case(seed=3, **kw)
    assert json.dumps([gt, res]) == json.dumps([gt2, res2]) and json.dumps(res) != json.dumps(res3)
    assert len(res) == 3 * 7 and all(3 <= v["length"] <= 6 for v in gt["videos"])
    for a in gt["annotations"]:
        assert a["areas"] == [None if s is None else float(mask_utils.area(s)) for s in a["segmentations"]]
    g = load_ground_truth(gt)
    check_results(res, g)  # raises if anything is malformed
    m = evaluate_tracks(g, check_results(res, g))
    assert 0.0 < m["AP"] <= 1.0


def test_benchmark_smoke():
    from devis_core.benchmarks.evaluation import format_report, run_benchmark

    r = run_benchmark(videos=2, frames=4, size=(48, 64), preds=5, categories=3, seed=0)
    assert r["num_predictions"] == 10 and r["total_s"] > 0 and r["peak_rss_mib"] >= r["baseline_rss_mib"] > 0
    assert math.isfinite(r["AP"]) and "peak RSS" in format_report(r)
