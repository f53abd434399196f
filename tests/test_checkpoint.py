"""Checkpoints: official key layouts load strictly, round trips, legacy files, conversions, loud mismatches."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from yacs.config import CfgNode

from devis_core.checkpoint import (CheckpointError, CheckpointMismatchError, check_state_dict, convert_state_dict,
                                   load_model_weights, read_checkpoint, save_checkpoint, shift_class_neurons)
from devis_core.config import load_config
from devis_core.models import build_model
from devis_core.testing import official_shapes, regenerated_state_dict

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "reference"
TINY = ["MODEL.HIDDEN_DIM", "128", "MODEL.NUM_QUERIES", "10", "MODEL.DIM_FEEDFORWARD", "64",
        "MODEL.TRANSFORMER.ENCODER_LAYERS", "1", "MODEL.TRANSFORMER.DECODER_LAYERS", "2",
        "MODEL.LOSS.MASK_AUX_LOSS", "[0]"]


def tiny(*extra):
    return build_model(load_config(None, TINY + list(extra)), 5, load_weights=False)


@pytest.mark.parametrize("listing,yaml", [
    ("state_dict_deformable_detr_R_50.txt", "configs/deformable_detr/deformable_detr_R_50.yaml"),
    ("state_dict_deformable_mask_head_R_50.txt", "configs/deformable_mask_head/deformable_mask_head_R_50.yaml"),
])
def test_official_full_size_state_dicts_load_strictly(listing, yaml):
    shapes = official_shapes(REFERENCE / listing)
    model = build_model(load_config(yaml), 91, load_weights=False)
    official = regenerated_state_dict(shapes, seed=7)
    check_state_dict(model, official, listing)
    model.load_state_dict(official, strict=True)
    prefix = "def_detr." if "mask_head" in listing else ""
    for i in range(6):  # the aliased box heads are one module, and got the (identical) official values
        a = model.state_dict()[f"{prefix}bbox_embed.{i}.layers.0.weight"]
        b = model.state_dict()[f"{prefix}transformer.decoder.bbox_embed.{i}.layers.0.weight"]
        assert a.data_ptr() == b.data_ptr()
        torch.testing.assert_close(a, official[f"{prefix}bbox_embed.{i}.layers.0.weight"])


def test_round_trip_through_official_layout(tmp_path):
    src = tiny("MODEL.MASK_ON", "True")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    path = save_checkpoint(tmp_path / "ckpt.pth", src, epoch=3, legacy_format=True)
    dst = tiny("MODEL.MASK_ON", "True")
    obj = load_model_weights(dst, path)
    assert obj["epoch"] == 3
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temporary file


def test_legacy_official_checkpoint_file(tmp_path):
    model = tiny()
    cfg = CfgNode({"MODEL": CfgNode({"NUM_QUERIES": 10})})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    path = tmp_path / "official.pth"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 7, "cfg": cfg}, path,
               _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="trusted"):
        read_checkpoint(path)  # a pickled CfgNode needs an explicit trust decision
    fresh = tiny()
    with pytest.warns(UserWarning, match="full unpickling"):
        obj = load_model_weights(fresh, path, trusted=True)
    assert obj["epoch"] == 7 and obj["cfg"].MODEL.NUM_QUERIES == 10
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    # Without pickled objects a legacy file loads with weights_only.
    torch.save({"model": model.state_dict(), "epoch": 1}, tmp_path / "plain.pth", _use_new_zipfile_serialization=False)
    assert read_checkpoint(tmp_path / "plain.pth")["epoch"] == 1


def test_mismatch_lists_missing_unexpected_and_wrong_shape(tmp_path):
    model = tiny()
    sd = model.state_dict()
    sd.pop("query_embed.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["class_embed.0.weight"] = torch.zeros(7, 128)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as info:
        load_model_weights(tiny(), tmp_path / "bad.pth")
    msg = str(info.value)
    assert "bad.pth" in msg and "1 missing key(s): query_embed.weight" in msg
    assert "1 unexpected key(s): extra.weight" in msg
    assert "class_embed.0.weight: (7, 128) vs (5, 128)" in msg
    assert info.value.missing == ["query_embed.weight"]


def test_shift_class_neuron_on_hand_made_tensors():
    sd = {"class_embed.0.weight": torch.arange(4.0)[:, None].repeat(1, 2), "class_embed.0.bias": torch.arange(4.0),
          "bbox_embed.0.layers.0.bias": torch.arange(4.0)}
    out = shift_class_neurons(sd)
    assert out["class_embed.0.bias"].tolist() == [1.0, 2.0, 3.0, 0.0]
    assert out["class_embed.0.weight"][:, 0].tolist() == [1.0, 2.0, 3.0, 0.0]
    assert out["bbox_embed.0.layers.0.bias"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_detector_checkpoint_into_mask_head_model_with_shift(tmp_path):
    det = tiny()
    with torch.no_grad():
        det.class_embed[1].bias.copy_(torch.arange(5.0))
    torch.save({"model": det.state_dict()}, tmp_path / "det.pth")
    segm = tiny("MODEL.MASK_ON", "True")
    head_before = {k: v.clone() for k, v in segm.state_dict().items() if k.startswith("mask_head.")}
    load_model_weights(segm, tmp_path / "det.pth", shift_class_neuron=True)
    assert segm.def_detr.class_embed[1].bias.tolist() == [1.0, 2.0, 3.0, 4.0, 0.0]
    assert torch.equal(segm.def_detr.query_embed.weight, det.query_embed.weight)
    for k, v in head_before.items():
        assert torch.equal(segm.state_dict()[k], v)
    with pytest.raises(CheckpointError, match="def_detr"):
        convert_state_dict(segm, {"mask_head.lay1.offset_conv.weight": torch.zeros(1)})


def test_backbone_weights_from_local_torchvision_file(tmp_path):
    resnet = torchvision.models.resnet50(weights=None)
    with torch.no_grad():
        resnet.layer3[0].conv2.weight.fill_(0.5)
        resnet.bn1.running_var.fill_(4.0)
    torch.save(resnet.state_dict(), tmp_path / "resnet50.pth")  # includes fc.* and num_batches_tracked
    cfg = load_config(None, TINY + ["MODEL.BACKBONE_WEIGHTS", str(tmp_path / "resnet50.pth")])
    model = build_model(cfg, 5)
    body = model.backbone[0].body
    assert (body["layer3"][0].conv2.weight == 0.5).all() and (body["bn1"].running_var == 4.0).all()
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    cfg = load_config(None, TINY + ["MODEL.BACKBONE_WEIGHTS", str(tmp_path / "resnet18.pth")])
    with pytest.raises(CheckpointMismatchError, match="MODEL.BACKBONE_WEIGHTS"):
        build_model(cfg, 5)


def test_weights_errors(tmp_path):
    with pytest.raises(CheckpointError, match="URL"):
        build_model(load_config(None, TINY + ["MODEL.WEIGHTS", "https://example.com/x.pth"]), 5)
    with pytest.raises(FileNotFoundError, match=r"MODEL.WEIGHTS: checkpoint .*nope.pth does not exist"):
        build_model(load_config(None, TINY + ["MODEL.WEIGHTS", str(tmp_path / "nope.pth")]), 5)
    with pytest.raises(FileNotFoundError, match=r"MODEL.BACKBONE_WEIGHTS: checkpoint .*r50.pth does not exist"):
        build_model(load_config(None, TINY + ["MODEL.BACKBONE_WEIGHTS", str(tmp_path / "r50.pth")]), 5)
