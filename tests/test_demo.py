"""Own videos (devis_core/demo.py): a folder of frames or a video file in, results + overlays out."""
from __future__ import annotations

import json
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from devis_core import demo
from devis_core.data.vis import build_vis_test_dataset
from devis_core.demo import DemoInputError, preprocess_frames, read_input
from devis_core.inference import infer_video
from test_inference import CONFIG, NUM_CLASSES, SIZE, cli_overrides, make_tiny_data, save_tiny_weights, tiny_cfg

av = pytest.importorskip("av", reason="PyAV (pip install av) reads video files")


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    data_path = make_tiny_data(root)
    cfg = tiny_cfg(data_path)
    weights = root / "tiny_devis.pth"
    model = save_tiny_weights(cfg, weights)
    dataset, _ = build_vis_test_dataset(cfg)
    folder = Path(dataset.index.image_root) / "valid_0001"        # the 7-frame video
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.jpg"))]
    assert len(frames) == 7
    return types.SimpleNamespace(root=root, data_path=data_path, cfg=cfg, weights=weights, model=model,
                                 dataset=dataset, folder=folder, frames=frames)


def run_main(tiny, input_path, out, *flags: str) -> None:
    argv = ["--config-file", CONFIG, "--weights", str(tiny.weights), "--input", str(input_path), "--out", str(out),
            *flags, *cli_overrides(tiny.data_path)]
    assert demo.main(argv) == 0


def test_preprocessing_is_the_test_dataset_one(tiny):
    expected = tiny.dataset.load_frames(1)
    got = preprocess_frames(tiny.frames, tiny.cfg.INPUT.MIN_SIZE_TEST, tiny.cfg.INPUT.MAX_SIZE_TEST)
    # 48x64 frames, short side 32, long side <= 48: 32x42 (42.67 truncated).
    assert got.shape == (7, 3, 32, 42) and got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_frame_folder_gives_results_and_overlays(tiny, tmp_path):
    out = tmp_path / "out"
    run_main(tiny, tiny.folder, out, "--score-threshold", "0.0", "--video-id", "5")
    results = json.loads((out / "results.json").read_text())
    with zipfile.ZipFile(out / "results.zip") as zf:
        assert json.loads(zf.read("results.json")) == results
    expected = infer_video(tiny.model, lambda ids: tiny.dataset.load_frames(1, ids), 5, 7, SIZE, tiny.cfg, "cpu")
    assert results == json.loads(json.dumps(expected))
    assert results and all(e["video_id"] == 5 and len(e["segmentations"]) == 7 for e in results)
    assert all(r is None or r["size"] == list(SIZE) for e in results for r in e["segmentations"])
    merged = sorted(p.name for p in (out / "overlays" / "merged").iterdir())
    assert merged == [f"{t:05d}.jpg" for t in range(7)]
    tracks = sorted(p.name for p in (out / "overlays").iterdir() if p.name.startswith("track_"))
    assert tracks == sorted(f"track_{k}" for k in range(len(results)))
    with Image.open(out / "overlays" / "merged" / "00003.jpg") as img:
        assert img.size == (SIZE[1], SIZE[0])


def test_score_threshold_limits_the_drawn_tracks_not_the_results(tiny, tmp_path):
    entries = infer_video(tiny.model, lambda ids: tiny.dataset.load_frames(1, ids), 1, 7, SIZE, tiny.cfg, "cpu")
    threshold = float(np.median([e["score"] for e in entries]))
    out = tmp_path / "out"
    run_main(tiny, tiny.folder, out, "--score-threshold", repr(threshold))
    assert len(json.loads((out / "results.json").read_text())) == len(entries)
    drawn = {p.name for p in (out / "overlays").iterdir() if p.name.startswith("track_")}
    assert drawn == {f"track_{k}" for k, e in enumerate(entries) if e["score"] >= threshold}
    assert 0 < len(drawn) < len(entries)


def _write_mp4(path: Path, frames: list[np.ndarray]) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_file_gives_entries_of_the_video_length(tiny, tmp_path):
    video = tmp_path / "clip.mp4"
    _write_mp4(video, tiny.frames)
    frames, _ = read_input(str(video))
    assert len(frames) == 7 and all(f.shape == (*SIZE, 3) and f.dtype == np.uint8 for f in frames)
    # Codec loss only: the decoded frames stay close to the originals.
    assert np.abs(np.stack(frames).astype(float) - np.stack(tiny.frames)).mean() < 20
    out = tmp_path / "out"
    run_main(tiny, video, out, "--score-threshold", "1.1")
    results = json.loads((out / "results.json").read_text())
    assert results and all(len(e["segmentations"]) == 7 for e in results)


def test_unreadable_inputs_are_named(tiny, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"this is not a video" * 50)
    with pytest.raises(DemoInputError, match=r"broken\.mp4: cannot be decoded as a video"):
        run_main(tiny, broken, tmp_path / "out")
    with pytest.raises(DemoInputError, match=r"missing: no such file or folder"):
        read_input(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DemoInputError, match=r"empty: no frames found"):
        read_input(str(empty))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(tiny.frames[0]).save(mixed / "a.png")
    Image.fromarray(tiny.frames[1][:40]).save(mixed / "b.png")
    with pytest.raises(DemoInputError, match=r"b\.png: frame is 40x64 \(HxW\), the first frame a\.png is 48x64"):
        read_input(str(mixed))
    assert not (tmp_path / "out" / "results.json").exists()


def test_class_count_and_category_names(tiny, tmp_path):
    assert demo.num_classes_from_checkpoint(str(tiny.weights)) == NUM_CLASSES
    names = tmp_path / "names.txt"
    names.write_text("disc\nsquare\n\ntriangle\n")
    assert demo.read_category_names(str(names)) == {1: "disc", 2: "square", 3: "triangle"}
    assert demo.read_category_names(tiny.dataset.index.ann_file) == {1: "disc", 2: "square", 3: "triangle"}
