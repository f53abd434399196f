"""Near-online video inference (devis_core/inference.py): infer_video against the tracker fed by hand, clip-by-clip
frame loading, result files, the visualisation hooks, the CLI in one process and under a 2-process gloo torchrun.

A tiny DeVIS (HIDDEN_DIM 128, 1 encoder / 2 decoder layers, T=3, stride 2) with random weights runs on a
synthetic dataset of three 48x64 videos of 4, 7 and 2 frames (seed 4): one of each partition case of spec §7.1.
The helpers at the top are imported by tests/test_demo.py and tests/test_evaluate_notebook.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from devis_core import inference
from devis_core.checkpoint import save_checkpoint
from devis_core.config import load_config
from devis_core.data.synthetic import make_synthetic_vis
from devis_core.data.vis import build_vis_test_dataset
from devis_core.inference import InferenceError, InferenceTiming, infer_video, run_inference, select_videos
from devis_core.models import build_model
from devis_core.models.nested import NestedTensor
from devis_core.tracking import build_tracker, partition_clips

REPO = Path(__file__).resolve().parents[1]
T, NUM_OUT, NUM_CLASSES = 3, 4, 3
SIZE = (48, 64)
LENGTHS = [4, 7, 2]           # the videos make_tiny_data writes, in file order
TINY = ["MODEL.HIDDEN_DIM", "128", "MODEL.DIM_FEEDFORWARD", "64", "MODEL.TRANSFORMER.ENCODER_LAYERS", "1",
        "MODEL.TRANSFORMER.DECODER_LAYERS", "2", "MODEL.DEVIS.NUM_FRAMES", str(T), "MODEL.NUM_QUERIES", str(5 * T),
        "TEST.NUM_OUT", str(NUM_OUT), "TEST.CLIP_TRACKING.STRIDE", "2", "INPUT.MIN_SIZE_TEST", "32",
        "INPUT.MAX_SIZE_TEST", "48", "DEVICE", "cpu", "DATASETS.VAL_DATASET", "synthetic_vis_val"]
CONFIG = "synthetic/devis_tiny.yaml"


def make_tiny_data(root: Path) -> str:
    """Synthetic YT-VIS data under root/data (valid split: videos of 4, 7, 2 frames, 3 categories); returns
    DATA_PATH."""
    data_path = root / "data"
    paths = make_synthetic_vis(str(data_path), "synthetic_vis", num_videos=(0, 3), frames=(2, 7), size=SIZE,
                               num_categories=NUM_CLASSES, objects=(1, 2), seed=4)
    lengths = [v["length"] for v in json.loads(Path(paths["valid_ann_file"]).read_text())["videos"]]
    assert lengths == LENGTHS, "the synthetic generator changed; pick a seed giving one short and two long videos"
    return str(data_path)


def tiny_cfg(data_path: str, *extra: str):
    return load_config(CONFIG, TINY + ["DATASETS.DATA_PATH", data_path] + list(extra))


def save_tiny_weights(cfg, path: Path, seed: int = 0):
    """A randomly initialised tiny DeVIS saved as a checkpoint; returns the model."""
    torch.manual_seed(seed)
    model = build_model(cfg, NUM_CLASSES, load_weights=False).eval()
    save_checkpoint(path, model)
    return model


def cli_overrides(data_path: str) -> list[str]:
    return TINY + ["DATASETS.DATA_PATH", data_path]


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    data_path = make_tiny_data(root)
    cfg = tiny_cfg(data_path)
    weights = root / "tiny_devis.pth"
    model = save_tiny_weights(cfg, weights)
    dataset, num_classes = build_vis_test_dataset(cfg)
    assert num_classes == NUM_CLASSES
    return types.SimpleNamespace(root=root, data_path=data_path, cfg=cfg, weights=weights, model=model,
                                 dataset=dataset)


def run_video(tiny, pos: int, cfg=None, **kwargs) -> list[dict]:
    video = tiny.dataset.index.videos[pos]
    return infer_video(tiny.model, lambda ids: tiny.dataset.load_frames(pos, ids), video["id"],
                       len(video["file_names"]), SIZE, cfg or tiny.cfg, "cpu", **kwargs)


# ------------------------------------------------------------------------------------------------
# infer_video

def test_long_video_gives_one_entry_per_track_covering_every_frame(tiny):
    cfg = tiny_cfg(tiny.data_path, "TEST.CLIP_TRACKING.MIN_FRAME_SCORE", "0.0",
                   "TEST.CLIP_TRACKING.MIN_TRACK_SCORE", "0.0")
    timing = InferenceTiming()
    entries = run_video(tiny, 1, cfg, timing=timing)
    # No thresholds: the square assignment keeps all NUM_OUT tracks alive through the 3 clips.
    assert len(entries) == NUM_OUT
    for e in entries:
        assert e["video_id"] == tiny.dataset.index.videos[1]["id"]
        assert len(e["segmentations"]) == 7
        assert all(rle is not None and rle["size"] == list(SIZE) for rle in e["segmentations"])
        assert mask_util.decode(e["segmentations"][0]).shape == SIZE
        assert 0.0 < e["score"] < 1.0 and 1 <= e["category_id"] <= NUM_CLASSES
    assert timing.frames == 7 and timing.forward_s > 0 and timing.stitch_s > 0
    assert timing.fps == pytest.approx(7 / (timing.forward_s + timing.stitch_s))


def test_short_video_pads_one_clip_and_outputs_its_real_frames(tiny):
    requests = []

    def load(ids):
        requests.append(list(ids))
        return tiny.dataset.load_frames(2, ids)

    entries = infer_video(tiny.model, load, 3, 2, SIZE, tiny.cfg, "cpu")
    # L=2 < T=3: one clip [0, 1, 0]; the repeated frame is loaded once.
    assert requests == [[0, 1]]
    assert entries and all(len(e["segmentations"]) == 2 for e in entries)
    assert all(rle is None or rle["size"] == list(SIZE) for e in entries for rle in e["segmentations"])


def test_inference_runs_in_eval_mode_and_restores_the_training_mode(tiny):
    assert tiny.cfg.MODEL.DROPOUT > 0        # in training mode dropout would change the outputs
    expected = run_video(tiny, 2)
    tiny.model.train()
    try:
        assert run_video(tiny, 2) == expected
        assert tiny.model.training
    finally:
        tiny.model.eval()


def test_infer_video_equals_the_tracker_fed_by_hand(tiny):
    pos, length = 1, 7
    vid = tiny.dataset.index.videos[pos]["id"]
    tracker = build_tracker(tiny.cfg, vid, length, SIZE)
    clips, _ = partition_clips(length, T, 2)
    assert clips == [[0, 1, 2], [2, 3, 4], [4, 5, 6]]
    with torch.no_grad():
        for ids in clips:
            frames = tiny.dataset.load_frames(pos, ids)
            samples = NestedTensor(frames, torch.zeros(len(ids), *frames.shape[-2:], dtype=torch.bool))
            tracker.add_clip(tiny.model.inference(samples, SIZE, T), ids[0], T)
    expected = tracker.finish()
    assert expected
    assert run_video(tiny, pos) == expected


def test_frames_are_loaded_clip_by_clip(tiny, monkeypatch):
    pos = 1
    forwards = []
    original = tiny.model.inference
    monkeypatch.setattr(tiny.model, "inference", lambda *a, **k: forwards.append(1) or original(*a, **k))
    requests, clips_seen = [], []

    def load(ids):
        requests.append((list(ids), len(forwards)))
        return tiny.dataset.load_frames(pos, ids)

    def on_clip(index, frame_ids, result):
        clips_seen.append((index, frame_ids))
        # (T', U, ceil(h/4), ceil(w/4)) logits; 48x64 frames are resized to 32x42 (short side 32, 42.67
        # truncated), so the /4 masks are 8x11.
        assert result["masks"].shape[0] == T and tuple(result["masks"].shape[-2:]) == (8, 11)

    infer_video(tiny.model, load, 2, 7, SIZE, tiny.cfg, "cpu", on_clip=on_clip)
    # Clips [0,3), [2,5), [4,7): each clip asks only for the frames the previous one did not hold, and only
    # once the previous clip went through the model.
    assert requests == [([0, 1, 2], 0), ([3, 4], 1), ([5, 6], 2)]
    assert clips_seen == [(0, [0, 1, 2]), (1, [2, 3, 4]), (2, [4, 5, 6])]


def test_bad_frames_from_the_loader_name_the_video(tiny):
    with pytest.raises(InferenceError, match=r"video 17: load_frames\(\[0, 1, 2\]\) returned \(2, 3, 8, 8\)"):
        infer_video(tiny.model, lambda ids: torch.zeros(2, 3, 8, 8), 17, 7, SIZE, tiny.cfg, "cpu")


# ------------------------------------------------------------------------------------------------
# run_inference

def test_run_inference_writes_results_in_file_order_atomically(tiny, tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace

    def recording_replace(src, dst):
        replaced.append((os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    results = run_inference(tiny.cfg, tiny.model, tiny.dataset, str(tmp_path), "cpu")
    expected = [e for pos in range(3) for e in run_video(tiny, pos)]
    assert results == expected
    save_dir = tmp_path / "eval_results"
    names = {"results.json", "results.zip", "metrics.json", "inference_summary.json"}
    assert {p.name for p in save_dir.iterdir()} == names          # no temporary file left behind
    assert {os.path.basename(dst) for _, dst in replaced} == names
    for src, dst in replaced:
        # Written under another name in the same folder, then renamed over the final name.
        assert os.path.dirname(src) == os.path.dirname(dst) == str(save_dir) and src != dst
    assert json.loads((save_dir / "results.json").read_text()) == json.loads(json.dumps(expected))
    with zipfile.ZipFile(save_dir / "results.zip") as zf:
        assert zf.namelist() == ["results.json"]
        assert zf.read("results.json") == (save_dir / "results.json").read_bytes()
    metrics = json.loads((save_dir / "metrics.json").read_text())
    assert metrics["num_videos"] == 3 and metrics["num_predictions"] == len(expected)
    assert -1.0 <= metrics["AP"] <= 1.0
    summary = json.loads((save_dir / "inference_summary.json").read_text())
    assert summary["frames"] == sum(LENGTHS) and summary["num_videos"] == 3 and summary["world_size"] == 1


def test_video_selection_and_subset_scoring(tiny, tmp_path):
    assert select_videos(tiny.dataset) == [0, 1, 2]
    assert select_videos(tiny.dataset, "valid_0002, valid_0000") == [0, 2]
    assert select_videos(tiny.dataset, "", max_videos=2) == [0, 1]
    with pytest.raises(InferenceError, match=r"VIDEO_NAMES lists \['nope'\]"):
        select_videos(tiny.dataset, "valid_0001,nope")
    cfg = tiny_cfg(tiny.data_path, "TEST.VIZ.VIDEO_NAMES", "valid_0002")
    report = inference.run_inference_report(cfg, tiny.model, tiny.dataset, tmp_path, "cpu", verbose=False)
    assert {e["video_id"] for e in report.results} == {tiny.dataset.index.videos[2]["id"]}
    # The ground truth is cut to the videos that ran: the others are not counted as missed.
    assert report.metrics["num_videos"] == 1 and report.timing.frames == 2


def test_public_split_without_ground_truth_writes_no_metrics(tiny, tmp_path):
    ann = json.loads(Path(tiny.dataset.index.ann_file).read_text())
    ann["annotations"] = None
    ann_file = tmp_path / "no_gt.json"
    ann_file.write_text(json.dumps(ann))
    from devis_core.data.vis import VISTestDataset

    dataset = VISTestDataset(tiny.dataset.index.image_root, str(ann_file), 32, 48)
    report = inference.run_inference_report(tiny.cfg, tiny.model, dataset, tmp_path / "out", "cpu", max_videos=1,
                                            verbose=False)
    assert report.metrics is None and report.metrics_json is None
    assert sorted(p.name for p in (tmp_path / "out" / "eval_results").iterdir()) == \
        ["inference_summary.json", "results.json", "results.zip"]


def test_visualisation_hooks_without_the_helper_fail_clearly(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "devis_core.result_viz", None)
    import devis_core.visualize as visualize

    monkeypatch.delattr(visualize, "write_video_visualisations", raising=False)
    cfg = tiny_cfg(tiny.data_path, "TEST.VIZ.OUT_VIZ_PATH", "viz")
    with pytest.raises(InferenceError, match=r"write_video_visualisations.*TEST\.VIZ\.OUT_VIZ_PATH"):
        run_inference(cfg, tiny.model, tiny.dataset, str(tmp_path), "cpu")
    cfg = tiny_cfg(tiny.data_path, "TEST.VIZ.SAVE_MERGED_TRACKS", "True")
    with pytest.raises(InferenceError, match="need TEST.VIZ.OUT_VIZ_PATH"):
        run_inference(cfg, tiny.model, tiny.dataset, str(tmp_path), "cpu")


def test_visualisation_hooks_call_the_helper(tiny, tmp_path, monkeypatch):
    calls = {"video": [], "clip": []}
    fake = types.ModuleType("devis_core.result_viz")
    fake.write_video_visualisations = lambda frames, entries, out_dir, **kw: calls["video"].append(
        (frames, entries, out_dir, kw)) or []
    fake.save_clip_visualisation = lambda frames, result, ids, out_dir, size, **kw: calls["clip"].append(
        (len(frames), frames[0].shape, sorted(result), list(ids), out_dir, tuple(size), kw)) or []
    monkeypatch.setitem(sys.modules, "devis_core.result_viz", fake)
    cfg = tiny_cfg(tiny.data_path, "TEST.VIZ.OUT_VIZ_PATH", "viz", "TEST.VIZ.SAVE_CLIP_VIZ", "True",
                   "TEST.VIZ.SAVE_MERGED_TRACKS", "True", "TEST.VIZ.VIDEO_NAMES", "valid_0001")
    results = run_inference(cfg, tiny.model, tiny.dataset, str(tmp_path), "cpu")
    viz = str(tmp_path / "viz" / "valid_0001")
    [(frames, entries, out_dir, kw)] = calls["video"]
    assert out_dir == viz and entries == results
    assert len(frames) == 7 and all(f.shape == (*SIZE, 3) and f.dtype == np.uint8 for f in frames)
    assert kw["per_track"] is True and kw["merged"] is True and kw["category_names"] == {1: "disc", 2: "square",
                                                                                          3: "triangle"}
    assert [c[3] for c in calls["clip"]] == [[0, 1, 2], [2, 3, 4], [4, 5, 6]]
    assert [c[4] for c in calls["clip"]] == [os.path.join(viz, "clip_results", f"window_{i}") for i in range(3)]
    assert all(c[0] == 3 and c[1] == (*SIZE, 3) and c[5] == SIZE and "masks" in c[2] for c in calls["clip"])
    assert calls["clip"][0][6]["min_frame_score"] == cfg.TEST.CLIP_TRACKING.MIN_FRAME_SCORE


# ------------------------------------------------------------------------------------------------
# Command line: one process and two gloo processes under torchrun

def _run_cli(args: list[str], tmp: Path, name: str) -> subprocess.CompletedProcess:
    # One thread per process in both runs, so CPU kernels reduce in the same order.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    (tmp / f"{name}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def cli_runs(tiny):
    common = ["--config-file", CONFIG, "--weights", str(tiny.weights), *cli_overrides(tiny.data_path)]
    one = tiny.root / "single"
    single = _run_cli(["-m", "devis_core.inference", *common[:4], "--out", str(one), *common[4:]], tiny.root, "single")
    two = tiny.root / "two"
    dist_args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "devis_core.inference",
                 *common[:4], "--out", str(two), "--device", "cpu", *common[4:]]
    double = _run_cli(dist_args, tiny.root, "two")
    return types.SimpleNamespace(single_dir=one / "eval_results", two_dir=two / "eval_results", single=single,
                                 double=double)


@pytest.mark.timeout(300)
def test_cli_single_process_writes_results_zip_and_metrics(cli_runs, tiny):
    out = cli_runs.single_dir
    results = json.loads((out / "results.json").read_text())
    assert [e["video_id"] for e in results] == sorted(e["video_id"] for e in results)
    assert {e["video_id"] for e in results} == {v["id"] for v in tiny.dataset.index.videos}
    by_video = {v["id"]: len(v["file_names"]) for v in tiny.dataset.index.videos}
    assert all(len(e["segmentations"]) == by_video[e["video_id"]] for e in results)
    with zipfile.ZipFile(out / "results.zip") as zf:
        assert json.loads(zf.read("results.json")) == results
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_videos"] == 3 and "per_category" in metrics
    assert "Average Precision" in cli_runs.single.stdout and "frames/s" in cli_runs.single.stdout


@pytest.mark.timeout(300)
def test_two_gloo_processes_match_the_single_process_run(cli_runs):
    one = json.loads((cli_runs.single_dir / "results.json").read_text())
    two = json.loads((cli_runs.two_dir / "results.json").read_text())
    # Both ranks did work: rank 0 videos 1 and 3, rank 1 video 2.
    assert "[rank 1] video 1/1" in cli_runs.double.stdout and "[rank 0] video 2/2" in cli_runs.double.stdout
    assert "processes: 2" in cli_runs.double.stdout
    assert len(one) == len(two) > 0
    for a, b in zip(one, two):
        assert (a["video_id"], a["category_id"]) == (b["video_id"], b["category_id"])
        assert a["segmentations"] == b["segmentations"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)
    m1 = json.loads((cli_runs.single_dir / "metrics.json").read_text())
    m2 = json.loads((cli_runs.two_dir / "metrics.json").read_text())
    assert m1["AP"] == pytest.approx(m2["AP"], abs=1e-6) and m1["num_videos"] == m2["num_videos"] == 3
