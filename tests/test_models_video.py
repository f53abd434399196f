"""DeVIS video model: official state dicts, mask-head -> DeVIS transfer, temporal conventions, gradient flow.

Numerical parity with the official code is in tests/test_parity.py (fixture devis_public.pt).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from devis_core.attention import default_temporal_frames
from devis_core.checkpoint import (CheckpointError, CheckpointMismatchError, TransferReport, check_state_dict,
                                   devis_transfer_state_dict)
from devis_core.config import load_config
from devis_core.criterion import build_criterion
from devis_core.models import DeVIS, build_model, clip_topk
from devis_core.models.nested import NestedTensor
from devis_core.testing import official_shapes, regenerated_state_dict

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "reference"
T = 3
TINY = ["MODEL.HIDDEN_DIM", "128", "MODEL.DIM_FEEDFORWARD", "64", "MODEL.TRANSFORMER.ENCODER_LAYERS", "1",
        "MODEL.TRANSFORMER.DECODER_LAYERS", "2", "MODEL.DROPOUT", "0.0", "MODEL.LOSS.MASK_AUX_LOSS", "[0]",
        "TEST.NUM_OUT", "4"]
VIDEO = ["DATASETS.TYPE", "vis", "SOLVER.BATCH_SIZE", "1", "MODEL.DEVIS.NUM_FRAMES", str(T),
         "MODEL.NUM_QUERIES", str(2 * T), "MODEL.BBX_GRADIENT_PROP", "True"]


def video_cfg(*extra: str):
    return load_config(None, TINY + VIDEO + list(extra))


def tiny_devis(*extra: str, num_classes: int = 5) -> DeVIS:
    model = build_model(video_cfg(*extra), num_classes, load_weights=False)
    assert isinstance(model, DeVIS)
    return model


def clip(seed: int = 0, size=(48, 64)) -> NestedTensor:
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(T, 3, *size, generator=g)
    return NestedTensor(frames, torch.zeros(T, *size, dtype=torch.bool))


def clip_targets(size=(48, 64)) -> list[dict]:
    """Two instances over T=3 frames, instance-major; instance 1 is absent on frame 2 (filler box)."""
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.52, 0.5, 0.4, 0.3], [0.55, 0.5, 0.4, 0.3],
                          [0.3, 0.6, 0.2, 0.2], [0.3, 0.62, 0.2, 0.2], [0.3, 0.62, 1e-6, 1e-6]])
    masks = torch.zeros(2 * T, *size, dtype=torch.bool)
    for n, box in enumerate(boxes):
        if box[2] > 1e-3:
            cx, cy, w, h = (box * torch.tensor([size[1], size[0], size[1], size[0]])).tolist()
            masks[n, int(cy - h / 2):int(cy + h / 2), int(cx - w / 2):int(cx + w / 2)] = True
    return [{"boxes": boxes, "labels": torch.tensor([1, 1, 1, 3, 3, 3]), "valid": torch.tensor([1, 1, 1, 1, 1, 0]),
             "masks": masks, "size": torch.tensor(size), "orig_size": torch.tensor(size)}]


# ------------------------------------------------------------------------------------------------
# official checkpoints


@pytest.mark.parametrize("name,classes", [("YT-19", 40), ("YT-21", 40), ("OVIS", 25)])
def test_official_devis_state_dicts_load_strictly(name, classes):
    listing = f"state_dict_devis_R_50_{name}.txt"
    shapes = official_shapes(REFERENCE / listing)
    assert len(shapes) == 704
    model = build_model(load_config(f"configs/devis/{name}/devis_R_50_{name}.yaml"), classes, load_weights=False)
    official = regenerated_state_dict(shapes, seed=11)
    check_state_dict(model, official, listing)
    model.load_state_dict(official, strict=True)
    sd = model.state_dict()
    for key in ("def_detr.backbone.1.temporal_embed", "def_detr.query_embed.weight",
                "def_detr.transformer.encoder.layers.0.self_attn.temporal_sampling_offsets.weight",
                "def_detr.transformer.decoder.layers.0.cross_attn.temporal_attention_weights.bias"):
        assert torch.equal(sd[key], official[key]), key
    assert sd["def_detr.bbox_embed.0.layers.0.weight"].data_ptr() == \
        sd["def_detr.transformer.decoder.bbox_embed.0.layers.0.weight"].data_ptr()


# ------------------------------------------------------------------------------------------------
# transfer from the Deformable Mask Head


def image_mask_head_sd(n_queries: int = 12, n_classes: int = 7) -> dict:
    image = build_model(load_config(None, TINY + ["MODEL.MASK_ON", "True", "MODEL.NUM_QUERIES", str(n_queries)]),
                        n_classes, load_weights=False)
    return regenerated_state_dict({k: v.shape for k, v in image.state_dict().items()}, seed=3)


def test_transfer_replicates_current_projections_and_reports():
    model = tiny_devis("MODEL.DEVIS.DEFORMABLE_ATTENTION.DEC_N_POINTS_TEMPORAL_FRAME", "2")
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    image = image_mask_head_sd()
    sd, report = devis_transfer_state_dict(model, image)
    assert isinstance(report, TransferReport)
    model.load_state_dict(sd, strict=True)
    # Decoder layer 1, head m=3, slot w=1, level l=2, temporal point p=1, coordinate y: row
    # (((m*W + w)*L + l)*P_t + p)*2 + 1 equals the current row ((m*L + l)*P + p)*2 + 1 (W=2, L=4, P=4, P_t=2).
    pre = "def_detr.transformer.decoder.layers.1.cross_attn."
    t_row = (((3 * 2 + 1) * 4 + 2) * 2 + 1) * 2 + 1
    c_row = ((3 * 4 + 2) * 4 + 1) * 2 + 1
    assert torch.equal(sd[pre + "temporal_sampling_offsets.weight"][t_row],
                       image[pre + "sampling_offsets.weight"][c_row])
    assert torch.equal(sd[pre + "temporal_sampling_offsets.bias"][t_row], image[pre + "sampling_offsets.bias"][c_row])
    # attention weights: row ((m*W + w)*L + l)*P_t + p vs (m*L + l)*P + p
    assert torch.equal(sd[pre + "temporal_attention_weights.weight"][((3 * 2 + 1) * 4 + 2) * 2 + 1],
                       image[pre + "attention_weights.weight"][(3 * 4 + 2) * 4 + 1])
    enc = "def_detr.transformer.encoder.layers.0.self_attn."
    assert torch.equal(sd[enc + "temporal_sampling_offsets.weight"].view(8, 2, 4, 4, 2, 128)[:, 0],
                       image[enc + "sampling_offsets.weight"].view(8, 4, 4, 2, 128))
    # queries, class heads and the temporal embedding keep the fresh model's values
    for key in ("def_detr.query_embed.weight", "def_detr.class_embed.0.weight", "def_detr.backbone.1.temporal_embed"):
        assert torch.equal(sd[key], fresh[key]) and key in report.reinitialised
    for key in ("def_detr.transformer.level_embed", "mask_head.lay1.regular_conv.weight",
                "def_detr.transformer.decoder.layers.0.self_attn.in_proj_weight"):
        assert torch.equal(sd[key], image[key]) and key in report.copied
    assert pre + "temporal_sampling_offsets.weight" in report.derived
    assert "def_detr.query_embed.weight" in report.ignored and "def_detr.class_embed.1.bias" in report.ignored
    assert set(report.copied) | set(report.derived) | set(report.reinitialised) == set(fresh)
    assert "re-initialised def_detr.query_embed.weight" in report.summary()


def test_transfer_optional_queries_and_class_rows():
    model = tiny_devis()
    image = image_mask_head_sd(n_queries=12)
    sd, report = devis_transfer_state_dict(model, image, finetune_query_embeddings=True, finetune_class_logits=True,
                                           class_id_map=[6, 0, 2, 3, 5])
    # N_q = 2 slots from 12 image queries: rows 0 and 6, repeated for each of the T frames (frame-major)
    q = image["def_detr.query_embed.weight"]
    assert torch.equal(sd["def_detr.query_embed.weight"], torch.cat([q[[0, 6]]] * T))
    assert torch.equal(sd["def_detr.class_embed.1.bias"], image["def_detr.class_embed.1.bias"][[6, 0, 2, 3, 5]])
    assert "def_detr.query_embed.weight" in report.derived and "def_detr.query_embed.weight" not in report.ignored
    with pytest.raises(CheckpointError, match="class_id_map"):
        devis_transfer_state_dict(model, image, finetune_class_logits=True)


def test_transfer_without_temporal_modules_keeps_fresh_init_and_fails_loudly_on_gaps():
    model = tiny_devis()
    image = image_mask_head_sd()
    key = "def_detr.transformer.encoder.layers.0.self_attn.temporal_sampling_offsets.bias"
    sd, report = devis_transfer_state_dict(model, image, finetune_temporal_modules=False)
    assert torch.equal(sd[key], model.state_dict()[key]) and key in report.reinitialised
    broken = dict(image)
    del broken["def_detr.transformer.level_embed"]
    broken["mask_head.lay1.regular_conv.weight"] = broken["mask_head.lay1.regular_conv.weight"][:, :-1]
    with pytest.raises(CheckpointMismatchError) as err:
        devis_transfer_state_dict(model, broken, source="my.pth")
    assert "my.pth" in str(err.value) and "def_detr.transformer.level_embed" in str(err.value)
    assert "mask_head.lay1.regular_conv.weight" in str(err.value)


# ------------------------------------------------------------------------------------------------
# conventions


def test_temporal_slots_and_instance_aware_references():
    ref = torch.arange(T * 2 * 1 * 4, dtype=torch.float64).view(T, 2, 1, 4)  # (T, N_q, L, 4)
    frames = default_temporal_frames(T)
    aware = tiny_devis().def_detr.transformer.decoder
    plain = tiny_devis("MODEL.DEVIS.DEFORMABLE_ATTENTION.INSTANCE_AWARE_ATTENTION",
                       "False").def_detr.transformer.decoder
    out = aware.temporal_references(ref, frames)
    assert out.shape == (T, 2, T - 1, 1, 4)
    # frame 1, slot 1: slots of frame 1 are frames [0, 2] -> the reference of the same query on frame 2
    assert torch.equal(out[1, 1, 1], ref[2, 1])
    assert torch.equal(out[0, 0, 0], ref[1, 0])
    own = plain.temporal_references(ref, frames)
    assert torch.equal(own[1, 1, 1], ref[1, 1]) and torch.equal(own[2, 0, 0], ref[2, 0])


def test_ablation_shapes():
    m = tiny_devis("MODEL.DEVIS.DEFORMABLE_ATTENTION.ENC_CONNECT_ALL_FRAMES", "False",
                   "MODEL.DEVIS.DEFORMABLE_ATTENTION.ENC_TEMPORAL_WINDOW", "2",
                   "MODEL.DEVIS.DEFORMABLE_ATTENTION.ENC_N_POINTS_TEMPORAL_FRAME", "1")
    enc = m.def_detr.transformer.encoder.layers[0].self_attn
    assert enc.temporal_sampling_offsets.out_features == 8 * 2 * 4 * 1 * 2
    enc_frames, dec_frames = m.def_detr.transformer.temporal_frames()
    # window 2 -> offsets [-1, 1]; frame 0 mirrors -1 to +1
    assert enc_frames.tolist() == [[1, 1], [0, 2], [1, 1]]
    assert dec_frames.tolist() == [[1, 2], [0, 2], [0, 1]]
    m.eval()
    with torch.no_grad():
        out = m(clip())
    assert out["pred_logits"].shape == (1, 2 * T, 5)
    one = tiny_devis("MODEL.NUM_FEATURE_LEVELS", "1", "MODEL.MASK_HEAD.USED_FEATURES",
                     "[['/32','encoded'],['/16','backbone'],['/8','backbone'],['/4','backbone']]",
                     "MODEL.MASK_HEAD.UPSAMPLING_RESOLUTIONS", "['/32']").eval()
    dec = one.def_detr.transformer.decoder.layers[0].cross_attn
    assert dec.temporal_attention_weights.out_features == 8 * 2 * 1 * 4
    with torch.no_grad():
        res = one.inference(clip(), (96, 128))
    assert res["masks"].shape[:2] == (T, len(torch.unique(res["top_k_idxs"])))
    assert res["masks"].shape[-2:] == (12, 16)


def test_clip_topk_hand_case():
    # T=2 frames, N_q=2 slots, K=2 classes; logits chosen as logit(p) for readable probabilities
    p = torch.tensor([[[0.9, 0.1], [0.2, 0.6]],      # frame 0: slot 0, slot 1
                      [[0.7, 0.3], [0.4, 0.8]]], dtype=torch.float64)
    logits = torch.logit(p).view(4, 2)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.4, 0.4]] * 2, dtype=torch.float64)
    res = clip_topk(logits, boxes, num_frames=2, k=3, tgt_size=(100, 200), clip_length=2)
    # frame means: (0,0) .8, (0,1) .2, (1,0) .3, (1,1) .7 -> pairs (0,0), (1,1), (1,0)
    assert res["top_k_idxs"].tolist() == [0, 1, 1] and res["inverse_idxs"].tolist() == [0, 1, 1]
    assert res["labels"].tolist() == [[1, 2, 1], [1, 2, 1]]
    torch.testing.assert_close(res["scores"], torch.tensor([[0.9, 0.6, 0.2], [0.7, 0.8, 0.4]], dtype=torch.float64))
    # slot 1 box: x in [-0.1, 0.3] * 200 -> clamped to [0, 60]; y in [0.7, 1.1] * 100 -> [70, 100]
    torch.testing.assert_close(res["boxes"][0, 1], torch.tensor([0.0, 70.0, 60.0, 100.0], dtype=torch.float64))
    torch.testing.assert_close(res["boxes"][1, 0], torch.tensor([80.0, 30.0, 120.0, 70.0], dtype=torch.float64))
    torch.testing.assert_close(res["center_points"][0, 2], torch.tensor([0.1, 0.9], dtype=torch.float64))
    # clip_length 1: only frame 0 counts -> (0,0) .9, (1,1) .6, (1,0) .2
    res1 = clip_topk(logits, boxes, num_frames=2, k=3, tgt_size=(100, 200), clip_length=1)
    assert res1["scores"].shape == (1, 3) and res1["top_k_idxs"].tolist() == [0, 1, 1]


def test_trajectory_masks_use_each_frames_own_maps():
    model = tiny_devis().eval()
    with torch.no_grad():
        feats = model.def_detr.forward_features(clip())
        masks = model.trajectory_masks(feats, torch.tensor([1, 0]))
        # slot 0 on frame 2 = query 2*N_q + 0 against frame 2's maps, computed alone
        single = model.mask_logits(feats, feats["hs"][-1][0, [2 * 2 + 0]], torch.tensor([2]))
    assert masks.shape == (2, T, 12, 16)
    torch.testing.assert_close(masks[1, 2], single[0], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# gradient flow and a live temporal path


def test_every_trainable_parameter_gets_a_finite_nonzero_gradient():
    torch.manual_seed(0)
    cfg = video_cfg()
    model = build_model(cfg, 5, load_weights=False).train()
    # Regenerated (non-zero) weights: the official init zeroes offset weights and the MDC offset convs,
    # which would hide whether gradients reach them.
    with torch.no_grad():
        own = model.state_dict()
        model.load_state_dict(regenerated_state_dict({k: v.shape for k, v in own.items()}, seed=5))
    targets = clip_targets()
    out = model(clip(), targets)
    criterion = build_criterion(cfg, 5)
    criterion.total_loss(criterion(out, targets)).backward()
    bad = [n for n, p in model.named_parameters() if p.requires_grad
           and (p.grad is None or not torch.isfinite(p.grad).all() or float(p.grad.abs().sum()) == 0.0)]
    assert not bad, f"parameters without a finite non-zero gradient: {bad}"
    assert model.def_detr.backbone[1].temporal_embed.grad.abs().sum(1).gt(0).all()  # every frame's row


def test_temporal_projections_carry_other_frames_into_the_encoder():
    model = tiny_devis().eval()
    a = clip(seed=1)
    b = NestedTensor(a.tensors.clone(), a.mask)
    b.tensors[2] += 1.0                       # only frame 2 changes
    with torch.no_grad():
        mem_a = model.def_detr.forward_features(a)["memory"]
        mem_b = model.def_detr.forward_features(b)["memory"]
        assert (mem_a[0] - mem_b[0]).abs().max() > 1e-4   # frame 0 sees frame 2
        # Silence every temporal slot (logits -> -inf in the joint softmax): frame 0's memory no longer
        # depends on frame 2, so the temporal projections were the only path.
        for layer in model.def_detr.transformer.encoder.layers:
            layer.self_attn.temporal_attention_weights.bias.fill_(-1e4)
        mem_a = model.def_detr.forward_features(a)["memory"]
        mem_b = model.def_detr.forward_features(b)["memory"]
    torch.testing.assert_close(mem_a[0], mem_b[0], rtol=0, atol=1e-6)
    assert (mem_a[2] - mem_b[2]).abs().max() > 1e-4


def test_decoder_self_attention_spans_all_frames():
    model = tiny_devis().eval()
    layer = model.def_detr.transformer.decoder.layers[0]
    tgt = torch.randn(T, 2, 128)
    pos = torch.zeros(T, 2, 128)
    ref = torch.rand(T, 2, 4, 2)
    shapes = torch.tensor([[3, 4], [2, 2], [1, 1], [1, 1]])
    starts = torch.tensor([0, 12, 16, 17])
    memory = torch.randn(T, 18, 128)          # 12 + 4 + 1 + 1 tokens
    temporal = {"temporal_reference_points": model.def_detr.transformer.decoder.temporal_references(
        ref, default_temporal_frames(T)), "temporal_frames": default_temporal_frames(T)}
    with torch.no_grad():
        base = layer(tgt, pos, ref, memory, shapes, starts, None, **temporal)
        tgt2 = tgt.clone()
        tgt2[2] += 1.0                          # queries of frame 2 only
        moved = layer(tgt2, pos, ref, memory, shapes, starts, None, **temporal)
    assert (base[0] - moved[0]).abs().max() > 1e-4


def test_build_model_initialises_devis_from_a_mask_head_checkpoint_file(tmp_path, caplog):
    image = image_mask_head_sd()
    path = tmp_path / "mask_head.pth"
    torch.save({"model": image}, path)
    with caplog.at_level("INFO", logger="devis_core.checkpoint"):
        model = build_model(video_cfg("MODEL.WEIGHTS", str(path), "MODEL.BACKBONE_WEIGHTS", ""), 5)
    sd = model.state_dict()
    assert torch.equal(sd["mask_head.out_lay.regular_conv.weight"], image["mask_head.out_lay.regular_conv.weight"])
    pre = "def_detr.transformer.encoder.layers.0.self_attn."
    assert torch.equal(sd[pre + "temporal_attention_weights.bias"].view(8, T - 1, 4, 4)[:, -1],
                       image[pre + "attention_weights.bias"].view(8, 4, 4))
    assert "re-initialised def_detr.query_embed.weight" in caplog.text
    # a DeVIS checkpoint of the same model loads as it is (no transfer)
    torch.save({"model": sd}, tmp_path / "devis.pth")
    again = build_model(video_cfg("MODEL.WEIGHTS", str(tmp_path / "devis.pth"), "MODEL.BACKBONE_WEIGHTS", ""), 5)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in sd.items())
