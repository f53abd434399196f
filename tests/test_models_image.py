"""Image models: position encoding, frozen BN, backbone, deformable attention module, transformer helpers,
heads, post-processing and the tiny Deformable DETR / Mask Head models (CPU, small shapes)."""
from __future__ import annotations

import math

import pytest
import torch

from devis_core.config import load_config
from devis_core.models import build_model, nested_tensor_from_tensor_list
from devis_core.models.backbone import FrozenBatchNorm2d, ResNetBody
from devis_core.models.deformable_attention import MSDeformAttn, sampling_locations
from devis_core.models.heads import inverse_sigmoid, refine_boxes
from devis_core.models.position_encoding import PositionEmbeddingSine
from devis_core.models.postprocess import PostProcess, PostProcessSegm, topk_detections
from devis_core.models.transformer import encoder_reference_points, valid_ratios

TINY = ["MODEL.HIDDEN_DIM", "128", "MODEL.NUM_QUERIES", "10", "MODEL.DIM_FEEDFORWARD", "64",
        "MODEL.TRANSFORMER.ENCODER_LAYERS", "1", "MODEL.TRANSFORMER.DECODER_LAYERS", "3",
        "MODEL.DROPOUT", "0.0", "TEST.NUM_OUT", "5", "MODEL.LOSS.MASK_AUX_LOSS", "[0]"]


def tiny_cfg(*extra: str):
    return load_config(None, TINY + list(extra))


@pytest.fixture(scope="module")
def samples():
    torch.manual_seed(0)
    return nested_tensor_from_tensor_list([torch.randn(3, 64, 80), torch.randn(3, 50, 72)])


def make_targets():
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]])
    m0 = torch.zeros(2, 64, 80, dtype=torch.bool)
    m0[0, 20:40, 24:56] = True
    m0[1, 30:45, 16:32] = True
    m1 = torch.zeros(1, 50, 72, dtype=torch.bool)
    m1[0, 10:30, 10:40] = True
    return [{"labels": torch.tensor([1, 3]), "boxes": boxes, "masks": m0},
            {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.35, 0.4, 0.4, 0.4]]), "masks": m1}]


# -- position encoding ---------------------------------------------------------------------------------
def test_sine_encoding_hand_values_without_offset():
    pe = PositionEmbeddingSine(num_pos_feats=4, temperature=100.0)
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    pos = pe(mask, dtype=torch.float64)
    assert pos.shape == (1, 8, 2, 3)
    eps, two_pi = 1e-6, 2 * math.pi
    y = torch.tensor([1.0, 2.0]) / (2 + eps) * two_pi        # no -0.5 offset: first row is 1/H of the way
    x = torch.tensor([1.0, 2.0, 3.0]) / (3 + eps) * two_pi
    dim_t = torch.tensor([1.0, 1.0, 100.0 ** 0.5, 100.0 ** 0.5])
    exp_y = torch.stack([torch.sin(y / dim_t[0]), torch.cos(y / dim_t[1]), torch.sin(y / dim_t[2]),
                         torch.cos(y / dim_t[3])])           # (4, H), interleaved sin/cos
    exp_x = torch.stack([torch.sin(x / dim_t[0]), torch.cos(x / dim_t[1]), torch.sin(x / dim_t[2]),
                         torch.cos(x / dim_t[3])])
    torch.testing.assert_close(pos[0, :4, :, 0], exp_y.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(pos[0, 4:, 0, :], exp_x.double(), atol=1e-6, rtol=0)


def test_sine_encoding_normalises_by_valid_extent():
    pe = PositionEmbeddingSine(num_pos_feats=2)
    mask = torch.zeros(1, 1, 4, dtype=torch.bool)
    mask[0, 0, 3] = True  # last column is padding: x counts stop at 3
    pos = pe(mask)
    x_last_valid = 3 / (3 + 1e-6) * 2 * math.pi
    assert pos[0, 2, 0, 2].item() == pytest.approx(math.sin(x_last_valid), abs=1e-6)
    assert pos[0, 2, 0, 3].item() == pytest.approx(math.sin(x_last_valid), abs=1e-6)


def test_learned_temporal_term_is_added_per_frame():
    pe = PositionEmbeddingSine(num_pos_feats=2, num_frames=2)
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    base = PositionEmbeddingSine(num_pos_feats=2)(mask)
    torch.testing.assert_close(pe(mask) - base, pe.temporal_embed[:, :, None, None].expand(2, 4, 2, 2).detach())
    with pytest.raises(ValueError, match="2 frames"):
        pe(torch.zeros(3, 2, 2, dtype=torch.bool))


# -- backbone ----------------------------------------------------------------------------------------------
def test_frozen_batchnorm_formula_and_num_batches_tracked():
    bn = FrozenBatchNorm2d(2)
    sd = {"weight": torch.tensor([2.0, 1.0]), "bias": torch.tensor([0.5, -1.0]),
          "running_mean": torch.tensor([1.0, 0.0]), "running_var": torch.tensor([3.0, 0.25]),
          "num_batches_tracked": torch.tensor(7)}
    bn.load_state_dict(sd, strict=True)
    x = torch.tensor([2.0, 4.0]).view(1, 2, 1, 1)
    y = bn(x).flatten()
    assert y[0].item() == pytest.approx((2 - 1) / math.sqrt(3 + 1e-5) * 2 + 0.5, rel=1e-6)
    assert y[1].item() == pytest.approx(4 / math.sqrt(0.25 + 1e-5) - 1.0, rel=1e-6)
    assert "num_batches_tracked" not in bn.state_dict()


def test_backbone_trainability_and_ceil_sizes():
    body = ResNetBody("resnet50", train_backbone=True)
    for name, p in body.named_parameters():
        assert p.requires_grad == any(s in name for s in ("layer2", "layer3", "layer4")), name
    assert not any(p.requires_grad for p in ResNetBody("resnet50", train_backbone=False).parameters())
    x = nested_tensor_from_tensor_list([torch.randn(3, 70, 45)])
    with torch.no_grad():
        feats = body(x)
    assert [tuple(f.tensors.shape[-2:]) for f in feats] == [(18, 12), (9, 6), (5, 3), (3, 2)]
    assert [f.tensors.shape[1] for f in feats] == [256, 512, 1024, 2048]


def test_padding_mask_follows_stages():
    x = nested_tensor_from_tensor_list([torch.randn(3, 64, 64), torch.randn(3, 32, 64)])
    assert x.mask[1, 32:].all() and not x.mask[1, :32].any() and not x.mask[0].any()
    with torch.no_grad():
        feats = ResNetBody("resnet50")(x)
    assert feats[0].mask[1, 8:].all() and not feats[0].mask[1, :8].any()


# -- deformable attention ------------------------------------------------------------------------------
def test_sampling_locations_points_and_boxes():
    shapes = torch.tensor([[4, 8]])
    off = torch.tensor([1.0, 2.0]).view(1, 1, 1, 1, 1, 2)
    loc = sampling_locations(torch.tensor([0.5, 0.5]).view(1, 1, 1, 2), off, shapes)
    torch.testing.assert_close(loc.flatten(), torch.tensor([0.5 + 1 / 8, 0.5 + 2 / 4]))
    off = torch.tensor([[1.0, -1.0], [0.0, 0.0]]).view(1, 1, 1, 1, 2, 2)  # P = 2 points
    box = torch.tensor([0.5, 0.5, 0.2, 0.4]).view(1, 1, 1, 4)
    loc = sampling_locations(box, off, shapes)
    torch.testing.assert_close(loc[0, 0, 0, 0, 0], torch.tensor([0.5 + 1 / 2 * 0.2 * 0.5, 0.5 - 1 / 2 * 0.4 * 0.5]))
    torch.testing.assert_close(loc[0, 0, 0, 0, 1], torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="last dim"):
        sampling_locations(torch.zeros(1, 1, 1, 3), off, shapes)


def test_attention_initial_offsets_are_radial():
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    bias = attn.sampling_offsets.bias.view(4, 2, 2, 2)
    torch.testing.assert_close(bias[0, 1], torch.tensor([[1.0, 0.0], [2.0, 0.0]]))      # head 0: +x
    torch.testing.assert_close(bias[1, 0], torch.tensor([[0.0, 1.0], [0.0, 2.0]]), atol=1e-6, rtol=0)  # 90°
    torch.testing.assert_close(bias[2, 0], torch.tensor([[-1.0, 0.0], [-2.0, 0.0]]), atol=1e-6, rtol=0)


def test_attention_uniform_weights_average_the_samples():
    # Zero attention logits spread weight 1/(L*P) on every sample; a constant value map returns itself.
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=1, n_heads=2, n_points=2).double()
    with torch.no_grad():
        attn.value_proj.weight.zero_()
        attn.value_proj.bias.fill_(3.0)
        attn.output_proj.weight.copy_(torch.eye(16))
        attn.output_proj.bias.zero_()
        attn.sampling_offsets.bias.zero_()
    shapes, start = torch.tensor([[4, 4]]), torch.tensor([0])
    ref = torch.full((1, 5, 1, 2), 0.5, dtype=torch.float64)
    out = attn(torch.randn(1, 5, 16, dtype=torch.float64), ref, torch.randn(1, 16, 16, dtype=torch.float64),
               shapes, start)
    torch.testing.assert_close(out, torch.full((1, 5, 16), 3.0, dtype=torch.float64))


def test_temporal_branch_with_silenced_slots_equals_image_attention():
    torch.manual_seed(0)
    img = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2).double()
    vid = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2, temporal_points=3,
                       num_temporal_frames=2).double()
    vid.load_state_dict(img.state_dict(), strict=False)
    with torch.no_grad():
        for lin in (img.sampling_offsets, img.attention_weights, vid.sampling_offsets, vid.attention_weights):
            lin.weight.normal_(0, 0.3)
        vid.load_state_dict(img.state_dict(), strict=False)
        vid.temporal_attention_weights.bias.fill_(-1e4)  # joint softmax gives these slots weight 0
    t, q = 3, 4
    shapes, start = torch.tensor([[3, 4], [2, 2]]), torch.tensor([0, 12])
    query = torch.randn(t, q, 16, dtype=torch.float64)
    value = torch.randn(t, 16, 16, dtype=torch.float64)
    ref = torch.rand(t, q, 2, 2, dtype=torch.float64)
    t_ref = torch.rand(t, q, 2, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(vid(query, ref, value, shapes, start, temporal_reference_points=t_ref),
                               img(query, ref, value, shapes, start))
    with torch.no_grad():
        vid.temporal_attention_weights.bias.zero_()
    assert not torch.allclose(vid(query, ref, value, shapes, start, temporal_reference_points=t_ref),
                              img(query, ref, value, shapes, start))
    with pytest.raises(ValueError, match="temporal_reference_points"):
        vid(query, ref, value, shapes, start)


# -- transformer helpers and heads ---------------------------------------------------------------------
def test_valid_ratios_and_encoder_reference_points():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 3:, :] = True       # 3 of 4 rows valid
    mask[0, :, 2:] = True       # 2 of 4 columns valid
    r = valid_ratios(mask)
    assert r.dtype == torch.float32 and r.tolist() == [[0.5, 0.75]]
    refs = encoder_reference_points(torch.tensor([[2, 2]]), torch.ones(1, 1, 2))
    assert refs.shape == (1, 4, 1, 2)
    torch.testing.assert_close(refs[0, :, 0], torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]))
    refs = encoder_reference_points(torch.tensor([[2, 2]]), torch.tensor([[[0.5, 1.0]]]))
    # x of the first pixel: 0.5 / (0.5 * 2) = 0.5, then times the level's own ratio 0.5 -> 0.25
    torch.testing.assert_close(refs[0, 0, 0], torch.tensor([0.25, 0.25]))


def test_inverse_sigmoid_and_box_refinement():
    assert inverse_sigmoid(torch.tensor(0.5)).item() == 0.0
    assert inverse_sigmoid(torch.tensor(0.0)).item() == pytest.approx(math.log(1e-5))
    assert inverse_sigmoid(torch.tensor(2.0)).item() == pytest.approx(math.log(1 / 1e-5))
    box = refine_boxes(torch.zeros(1, 4), torch.tensor([[0.25, 0.75]]))
    torch.testing.assert_close(box, torch.tensor([[0.25, 0.75, 0.5, 0.5]]))
    box = refine_boxes(torch.tensor([[math.log(3.0), 0.0, 0.0, 0.0]]), torch.tensor([[0.5, 0.5, 0.2, 0.5]]))
    torch.testing.assert_close(box, torch.tensor([[0.75, 0.5, 0.2, 0.5]]))


# -- post-processing -------------------------------------------------------------------------------------
def test_topk_and_box_postprocess():
    logits = torch.tensor([[[0.0, 3.0, -1.0], [2.0, -5.0, 4.0]]])  # (1, Q=2, K=3)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.5, 0.5, 1.0]]])
    top = topk_detections(logits, boxes, 3)
    assert top["labels"].tolist() == [[2, 1, 0]] and top["query_indexes"].tolist() == [[1, 0, 1]]
    torch.testing.assert_close(top["scores"], torch.sigmoid(torch.tensor([[4.0, 3.0, 2.0]])))
    res = PostProcess(num_out=2)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    torch.testing.assert_close(res[0]["boxes"], torch.tensor([[0.0, 0.0, 100.0, 100.0], [80.0, 30.0, 120.0, 70.0]]))
    with pytest.raises(ValueError, match="NUM_OUT"):
        topk_detections(logits, boxes, 7)


def test_mask_postprocess_crops_and_resizes():
    logits = torch.full((2, 1, 2, 2), -10.0)
    logits[:, 0, 0, 0] = 10.0  # top-left cell on; bilinear x2 turns the top-left 2x2 pixels on (10, 5 > 0)
    out = {"topk": {"masks": logits}}
    # Image 0 fills the 4x4 padded batch; image 1 is the top-left 2x2 of it.
    res = PostProcessSegm()([{}, {}], out, orig_target_sizes=torch.tensor([[4, 4], [3, 3]]),
                            max_target_sizes=torch.tensor([[4, 4], [2, 2]]))
    m0, m1 = res[0]["masks"], res[1]["masks"]
    assert m0.shape == (1, 1, 4, 4) and m0.dtype == torch.bool and m1.shape == (1, 1, 3, 3)
    assert m0[0, 0].tolist() == [[True, True, False, False], [True, True, False, False],
                                 [False] * 4, [False] * 4]
    assert m1.all()  # the crop is entirely on, then resized to 3x3


# -- whole models ----------------------------------------------------------------------------------------
def test_box_model_shapes(samples):
    cfg = tiny_cfg()
    model = build_model(cfg, 5, load_weights=False).eval()
    with torch.no_grad():
        out = model(samples)
    assert out["pred_logits"].shape == (2, 10, 5) and out["pred_boxes"].shape == (2, 10, 4)
    assert len(out["aux_outputs"]) == 2
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    sd = model.state_dict()
    assert "transformer.decoder.bbox_embed.2.layers.2.bias" in sd and "bbox_embed.2.layers.2.bias" in sd
    assert model.transformer.decoder.bbox_embed[1] is model.bbox_embed[1]
    assert tuple(sd["input_proj.3.0.weight"].shape) == (128, 2048, 3, 3)  # /64 level from raw C5


def test_mask_model_training_outputs_and_gradients(samples):
    cfg = tiny_cfg("MODEL.MASK_ON", "True")
    model = build_model(cfg, 5, load_weights=False).train()
    targets = make_targets()
    out = model(samples, targets)
    n = [len(s) for s, _ in out["indices"]]
    assert n == [2, 1]
    assert out["pred_masks"].shape == (3, 16, 20)              # ceil(64/4) x ceil(80/4)
    assert out["aux_outputs"][0]["pred_masks"].shape == (3, 16, 20) and "indices" in out["aux_outputs"][0]
    assert "pred_masks" not in out["aux_outputs"][1]
    out["pred_masks"].sum().backward()
    body = model.def_detr.backbone[0].body
    assert body["layer1"][0].conv1.weight.grad is None         # frozen stem/layer1
    assert body["layer2"][0].conv1.weight.grad.abs().sum() > 0
    assert model.mask_head.lay1.regular_conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs targets"):
        model(samples)


def test_mask_model_eval_topk_masks(samples):
    cfg = tiny_cfg("MODEL.MASK_ON", "True")
    model = build_model(cfg, 5, load_weights=False).eval()
    with torch.no_grad():
        out = model(samples)
    top = out["topk"]
    assert top["masks"].shape == (2, 5, 16, 20) and top["scores"].shape == (2, 5)
    # Each top-k mask is the mask of its query: recompute one directly.
    with torch.no_grad():
        feats = model.def_detr.forward_features(samples)
        q = top["query_indexes"][1, 2]
        one = model.mask_logits(feats, feats["hs"][-1][1, q][None], torch.tensor([1]))
    torch.testing.assert_close(one[0], top["masks"][1, 2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prop", [True, False])
def test_bbx_gradient_prop_controls_reference_detach(samples, prop):
    cfg = tiny_cfg("MODEL.BBX_GRADIENT_PROP", str(prop))
    model = build_model(cfg, 5, load_weights=False).train()
    with torch.no_grad():  # a non-zero last box layer so the refinement depends on it
        model.bbox_embed[0].layers[2].weight.normal_(0, 0.01)
    out = model(samples)
    out["pred_boxes"].sum().backward()
    grad = model.bbox_embed[0].layers[2].weight.grad
    # Final boxes depend on layer 0's box head only through the (un)detached references.
    assert (grad is not None and grad.abs().sum() > 0) == prop


def test_builder_errors():
    # DATASETS.TYPE 'vis' builds DeVIS (tests/test_models_video.py); its unimplemented 3-D head ablation fails loudly.
    with pytest.raises(ValueError, match="CONV_HEAD_3D"):
        build_model(load_config(None, ["DATASETS.TYPE", "vis", "SOLVER.BATCH_SIZE", "1",
                                       "MODEL.MASK_HEAD.DEVIS.CONV_HEAD_3D", "True"]), 40, load_weights=False)
    with pytest.raises(ValueError, match="USED_FEATURES"):
        build_model(tiny_cfg("MODEL.MASK_ON", "True", "MODEL.MASK_HEAD.USED_FEATURES",
                             "[['/32','encoded'],['/16','encoded'],['/8','encoded'],['/2','backbone']]"), 5,
                    load_weights=False)
    with pytest.raises(ValueError, match="MASK_AUX_LOSS"):
        build_model(tiny_cfg("MODEL.MASK_ON", "True", "MODEL.LOSS.MASK_AUX_LOSS", "[2]"), 5, load_weights=False)
