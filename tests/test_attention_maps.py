"""Decoder attention maps (devis_core.attention_maps) on a tiny random DeVIS: capture, geometry, plots, command."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from devis_core.attention_maps import (attention_points, capture_attention, decoder_attention,
                                       decoder_attention_layers, main, plot_attention_map)
from devis_core.config import load_config
from devis_core.models import build_model
from devis_core.models.deformable_attention import MSDeformAttn

T, N_Q, HEADS, LEVELS, POINTS = 3, 2, 8, 4, 4
TINY = ["MODEL.HIDDEN_DIM", "128", "MODEL.DIM_FEEDFORWARD", "64", "MODEL.TRANSFORMER.ENCODER_LAYERS", "1",
        "MODEL.TRANSFORMER.DECODER_LAYERS", "2", "MODEL.DROPOUT", "0.0", "MODEL.LOSS.MASK_AUX_LOSS", "[0]",
        "TEST.NUM_OUT", "3", "DATASETS.TYPE", "vis", "SOLVER.BATCH_SIZE", "1", "MODEL.DEVIS.NUM_FRAMES", str(T),
        "MODEL.NUM_QUERIES", str(N_Q * T), "MODEL.BBX_GRADIENT_PROP", "True"]


def _randomise(model: torch.nn.Module) -> None:
    """Non-zero attention logits, offsets and box heads, so weights are not uniform and boxes move."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("attention_weights", "sampling_offsets", "bbox_embed", "query_embed",
                                       "class_embed")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(load_config(None, TINY), 5, load_weights=False)
    _randomise(m)
    return m.eval()


@pytest.fixture(scope="module")
def clip():
    return torch.randn(T, 3, 40, 56, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def layers(model, clip):
    return decoder_attention_layers(model, clip)


def test_shapes_and_selection(layers):
    assert [a["layer"] for a in layers] == [0, 1]
    w = T - 1
    for a in layers:
        assert a["locations"].shape == (T, N_Q, HEADS, LEVELS, POINTS, 2)
        assert a["weights"].shape == (T, N_Q, HEADS, LEVELS, POINTS)
        assert a["temporal_locations"].shape == (T, N_Q, HEADS, w, LEVELS, POINTS, 2)
        assert a["temporal_weights"].shape == (T, N_Q, HEADS, w, LEVELS, POINTS)
        assert a["temporal_frames"].tolist() == [[1, 2], [0, 2], [0, 1]]
        assert a["frame_size"] == (40, 56)
        topk = a["topk"]
        assert topk["scores"].shape == (T, 3) and topk["top_k_idxs"].shape == (3,)
        assert topk["masks"].shape[:2] == (T, len(torch.unique(topk["top_k_idxs"])))
    # Layer 0 reads points (reference_points head), later layers the refined boxes.
    assert layers[0]["references"].shape == (T, N_Q, 2)
    assert layers[1]["references"].shape == (T, N_Q, 4)
    assert layers[1]["temporal_references"].shape == (T, N_Q, w, 4)


def test_current_and_temporal_weights_sum_to_one_per_head(layers):
    for a in layers:
        total = a["weights"].sum((-2, -1)) + a["temporal_weights"].sum((-3, -2, -1))
        torch.testing.assert_close(total, torch.ones(T, N_Q, HEADS), atol=1e-5, rtol=0)
        # Not uniform: the randomised logits give the own frame a share other than 16/48.
        assert not torch.allclose(a["weights"].sum((-3, -2, -1)), torch.full((T, N_Q), HEADS / 3.0), atol=1e-3)


def test_references_are_the_decoders_and_temporal_ones_instance_aware(model, clip, layers):
    with torch.no_grad():
        feats = model.def_detr.forward_features(clip)
    init = feats["init_reference"][0].view(T, N_Q, 2)
    refs1 = feats["inter_references"][0, 0].view(T, N_Q, 4)     # output of layer 0 = input of layer 1
    torch.testing.assert_close(layers[0]["references"], init, atol=0, rtol=0)
    torch.testing.assert_close(layers[1]["references"], refs1, atol=0, rtol=0)
    for a, ref in ((layers[0], init), (layers[1], refs1)):
        for t in range(T):
            others = [f for f in range(T) if f != t]
            for w, other in enumerate(others):
                for i in range(N_Q):
                    # Slot w of query (t, i) samples frame t' around the reference of (t', i).
                    assert torch.equal(a["temporal_references"][t, i, w], ref[other, i])
    # ... which is not the query's own reference: the boxes differ between frames.
    assert not torch.allclose(layers[1]["temporal_references"][0, :, 0], refs1[0])


def test_temporal_locations_follow_the_instance_aware_boxes(model, clip, layers):
    """Recompute layer 1's temporal sampling locations from its query input (spec §3.5, 4-D refs):
    loc = r[t', i, :2] + offset / P_t * r[t', i, 2:] / 2, offsets from temporal_sampling_offsets."""
    attn_module = model.def_detr.transformer.decoder.layers[1].cross_attn
    seen = {}

    def keep_query(_module, args) -> None:
        seen["query"] = args[0].detach()

    handle = attn_module.register_forward_pre_hook(keep_query)
    try:
        with torch.no_grad():
            model.def_detr.forward_features(clip)
    finally:
        handle.remove()
    with torch.no_grad():
        offsets = attn_module.temporal_sampling_offsets(seen["query"]).view(T, N_Q, HEADS, T - 1, LEVELS, POINTS, 2)
    refs = layers[1]["references"]
    a = layers[1]
    for t in range(T):
        for w, other in enumerate(a["temporal_frames"][t].tolist()):
            box = refs[other]                                                  # (N_Q, 4)
            expected = box[:, None, None, None, :2] + offsets[t, :, :, w] / POINTS * box[:, None, None, None, 2:] * 0.5
            torch.testing.assert_close(a["temporal_locations"][t, :, :, w], expected, atol=1e-6, rtol=1e-5)


def test_capture_off_is_bit_identical_and_stores_nothing(model, clip):
    modules = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    with torch.no_grad():
        plain = model.def_detr.forward_features(clip)
    assert all(m.last_attention is None and not m.capture for m in modules)
    with capture_attention(model) as captured, torch.no_grad():
        assert len(captured) == len(modules) == 3           # 1 encoder + 2 decoder layers
        recorded = model.def_detr.forward_features(clip)
        assert all(m.last_attention is not None for m in modules)
    assert torch.equal(plain["hs"], recorded["hs"])
    assert torch.equal(plain["inter_references"], recorded["inter_references"])
    assert all(m.last_attention is None and not m.capture for m in modules)
    decoder_attention(model, clip, layer=0)
    assert all(m.last_attention is None and not m.capture for m in modules)
    with torch.no_grad():
        again = model.def_detr.forward_features(clip)
    assert torch.equal(plain["hs"], again["hs"])
    assert all(m.last_attention is None for m in modules)


def test_attention_points_group_by_sampled_frame(layers):
    a = layers[1]
    pts = attention_points(a, slot=1, frame=2, level="merged", head=3)
    assert [len(w) for _, w in pts] == [LEVELS * POINTS] * T            # one slot per other frame, own frame
    assert sum(w.sum() for _, w in pts) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(pts[2][0], a["locations"][2, 1, 3].reshape(-1, 2).double().numpy())
    np.testing.assert_allclose(pts[0][1], a["temporal_weights"][2, 1, 3, 0].reshape(-1).double().numpy())
    one_level = attention_points(a, slot=1, frame=2, level=2, head="all")
    assert [len(w) for _, w in one_level] == [HEADS * POINTS] * T
    with pytest.raises(ValueError, match="level"):
        attention_points(a, slot=1, frame=2, level=LEVELS)
    with pytest.raises(IndexError, match="frame 5"):
        attention_points(a, slot=0, frame=5)


def test_plot_attention_map_draws_points_and_reference_boxes(layers):
    a = layers[1]
    frames = [np.full((40, 56, 3), 40 * t, np.uint8) for t in range(T)]
    fig = plot_attention_map(frames, a, track=0, frame=1, level="merged", head="all")
    panels = fig.axes[:T]
    assert len(fig.axes) == T + 1                          # + colour bar
    counts = [sum(len(c.get_offsets()) for c in ax.collections) for ax in panels]
    assert counts == [HEADS * LEVELS * POINTS] * T
    styles = [[p.get_linestyle() for p in ax.patches] for ax in panels]
    assert styles == [["--"], ["-"], ["--"]]                 # solid on the query frame only
    slot = int(a["topk"]["top_k_idxs"][0])
    cx, cy, w, h = a["references"][1, slot].tolist()
    rect = panels[1].patches[0]
    assert rect.get_xy() == pytest.approx(((cx - w / 2) * 56 - 0.5, (cy - h / 2) * 40 - 0.5), abs=1e-6)
    fig_head = plot_attention_map(frames, a, slot=1, track=None, frame=0, level=0, head=2)
    assert [sum(len(c.get_offsets()) for c in ax.collections) for ax in fig_head.axes[:T]] == [POINTS] * T
    with pytest.raises(ValueError, match="3 frames"):
        plot_attention_map(frames[:2], a)


def test_command_writes_pngs(model, tmp_path):
    weights = tmp_path / "tiny.pth"
    torch.save({"model": model.state_dict()}, weights)
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    rng = np.random.default_rng(0)
    for t in range(4):
        Image.fromarray(rng.integers(0, 255, (30, 44, 3), dtype=np.uint8)).save(frames_dir / f"{t:05d}.png")
    config = tmp_path / "tiny.yaml"
    config.write_text("DATASETS:\n  TYPE: 'vis'\nINPUT:\n  MIN_SIZE_TEST: 32\n  MAX_SIZE_TEST: 64\n")
    out = tmp_path / "maps"
    written = main(["--config-file", str(config), "--weights", str(weights), "--input", str(frames_dir),
                    "--out", str(out), "--frames", "1", "3", "--num-tracks", "2", "--layer", "0"] + TINY)
    expected = {f"layer0_track{k}_frame{t}.png" for k in range(2) for t in range(2)}
    assert set(os.listdir(out)) == expected
    assert sorted(written) == sorted(str(out / n) for n in expected)
    for name in expected:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.size[0] > 100
    with pytest.raises(ValueError, match="--frames"):
        main(["--config-file", str(config), "--weights", str(weights), "--input", str(frames_dir),
              "--frames", "0", "1", "2", "3", "--out", str(out)] + TINY)
