"""The host-overhead benchmark (devis_core/benchmarks/host_overhead.py) and the per-shape constants the
transformer caches to cut that overhead (level layouts, frame-slot tables)."""
from __future__ import annotations

import pytest
import torch

from devis_core.attention import default_temporal_frames
from devis_core.benchmarks.host_overhead import StageRecorder, _counting, format_table, main, synthetic_clip
from devis_core.config import load_config
from devis_core.models import build_model
from devis_core.models.transformer import encoder_reference_points, level_layout

TINY = ["MODEL.HIDDEN_DIM", "128", "MODEL.DIM_FEEDFORWARD", "64", "MODEL.TRANSFORMER.ENCODER_LAYERS", "1",
        "MODEL.TRANSFORMER.DECODER_LAYERS", "2", "MODEL.LOSS.MASK_AUX_LOSS", "[0]", "TEST.NUM_OUT", "4",
        "MODEL.NUM_QUERIES", "6", "MODEL.DEVIS.NUM_FRAMES", "3", "TEST.CLIP_TRACKING.STRIDE", "2"]


def test_stage_recorder_charges_ops_and_time_to_the_innermost_stage():
    rec = StageRecorder("outside")
    x = torch.ones(3)
    with _counting(rec, torch.device("cpu")):
        x + 1                                      # outside
        with rec.stage("outer"):
            x * 2
            with rec.stage("inner"):
                x * 3
                x.sum().item()                     # a value read: counted as a sync in a CPU run
            x - 1
    assert rec.ops["outside"]["add"] == 1
    assert rec.ops["outer"]["mul"] == 1 and rec.ops["outer"]["sub"] == 1 and "sum" not in rec.ops["outer"]
    assert rec.ops["inner"]["mul"] == 1 and rec.ops["inner"]["sum"] == 1
    assert rec.syncs["inner"] == 1 and rec.syncs["outer"] == 0
    assert rec.stack == ["outside"]
    assert all(rec.seconds[k] > 0 for k in ("outer", "inner"))


def test_synthetic_clip_is_in_the_training_target_format():
    samples, (target,) = synthetic_clip(3, (40, 48), 2)
    assert samples.tensors.shape == (3, 3, 40, 48) and not samples.mask.any()
    assert target["boxes"].shape == (6, 4) and target["labels"].shape == (6,) and target["masks"].shape == (6, 40, 48)
    # instance-major: one label per instance, repeated over its frames; last entry absent with a filler box
    assert target["labels"].view(2, 3).unique(dim=1).shape == (2, 1)
    assert target["valid"].tolist() == [True] * 5 + [False]
    assert target["boxes"][-1, 2:].tolist() == pytest.approx([1e-6, 1e-6]) and not target["masks"][-1].any()
    assert all(target["masks"][i].any() for i in range(5))


def test_benchmark_command_prints_both_tables(capsys):
    assert main(["--config", "synthetic/devis_synthetic_learn.yaml", "--size", "32x48", "--iters", "2",
                 "--stage-ops", "2", *TINY]) == 0
    text = capsys.readouterr().out
    for expected in ("training iteration", "inference, per clip", "backbone", "matcher", "loss_boxes",
                     "backward", "optimizer.step", "tracker.add_clip", "total"):
        assert expected in text, expected


def test_format_table_totals_are_the_sum_of_the_rows():
    res = {"stages": {"a": {"ops": 10, "syncs": 1, "host_ms": 3.0}, "b": {"ops": 5, "syncs": 0, "host_ms": 1.0}},
           "wall_ms": 4.5}
    total = format_table("t", res).splitlines()[-2].split()
    assert total == ["total", "15", "1", "4.00"]


def test_level_layout_reproduces_the_reference_points_bit_for_bit():
    shapes = [(3, 5), (2, 3), (1, 2)]
    ratios = torch.tensor([[[1.0, 1.0], [0.75, 0.5], [1.0, 0.5]], [[0.5, 1.0], [1.0, 1.0], [0.25, 0.75]]])
    layout = level_layout(shapes)
    assert layout.spatial_shapes.tolist() == [[3, 5], [2, 3], [1, 2]]
    assert layout.level_start_index.tolist() == [0, 15, 21]
    assert layout.token_level.tolist() == [0] * 15 + [1] * 6 + [2] * 2
    got = encoder_reference_points(layout.spatial_shapes, ratios, layout)
    # The definition, level by level: ((j+0.5) / (r_w W), (i+0.5) / (r_h H)), times each level's ratio.
    rows = []
    for lvl, (h, w) in enumerate(shapes):
        for i in range(h):
            for j in range(w):
                rows.append(torch.stack([torch.tensor(j + 0.5) / (ratios[:, lvl, 0] * w),
                                         torch.tensor(i + 0.5) / (ratios[:, lvl, 1] * h)], -1))
    want = torch.stack(rows, 1)[:, :, None] * ratios[:, None]
    assert torch.equal(got, want)
    assert torch.equal(encoder_reference_points(layout.spatial_shapes, ratios), got)   # without a cached layout


def test_transformer_caches_layouts_per_shape_and_slot_tables_per_device():
    cfg = load_config(None, TINY + ["DATASETS.TYPE", "vis", "SOLVER.BATCH_SIZE", "1", "MODEL.DROPOUT", "0.0"])
    torch.manual_seed(0)
    model = build_model(cfg, 4, load_weights=False).eval()
    tr = model.def_detr.transformer
    a = tr.layout(((4, 6), (2, 3)), torch.device("cpu"))
    assert tr.layout(((4, 6), (2, 3)), torch.device("cpu")) is a
    b = tr.layout(((5, 6), (3, 3)), torch.device("cpu"))
    assert b is not a and b.spatial_shapes.tolist() == [[5, 6], [3, 3]]
    enc, dec = tr.temporal_frames()
    assert tr.temporal_frames()[0] is enc and torch.equal(enc, default_temporal_frames(3))
    assert torch.equal(dec, default_temporal_frames(3))
    # Two input sizes through one model (the cache keyed by shape) give what a fresh model gives.
    fresh = build_model(cfg, 4, load_weights=False).eval()
    fresh.load_state_dict(model.state_dict())
    for size in ((64, 96), (48, 80), (64, 96)):
        samples, _ = synthetic_clip(3, size, 1, seed=size[0])
        with torch.no_grad():
            got = model(samples)["pred_boxes"]
            fresh._modules["def_detr"].transformer._layout_cache.clear()
            want = fresh(samples)["pred_boxes"]
        assert torch.equal(got, want), size
    assert len(tr._layout_cache) == 4          # the two built above and one per input size
    assert "_layout_cache" not in str(list(model.state_dict()))
