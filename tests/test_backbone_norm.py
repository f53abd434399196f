"""Backbone normalisation: the frozen batch norm's cached affine terms and the group-norm option."""
import pytest
import torch
from torch import nn

from devis_core.config import load_config
from devis_core.models.backbone import FrozenBatchNorm2d, ResNetBody
from devis_core.models.nested import NestedTensor


def _bn_with(weight, bias, mean, var):
    bn = FrozenBatchNorm2d(len(weight))
    bn.load_state_dict({"weight": torch.tensor(weight), "bias": torch.tensor(bias),
                        "running_mean": torch.tensor(mean), "running_var": torch.tensor(var)})
    return bn


def test_frozen_bn_cache_follows_every_buffer_change():
    x = torch.ones(1, 2, 1, 1, dtype=torch.float64)
    bn = _bn_with([2.0, 1.0], [0.5, 0.0], [1.0, -1.0], [4.0 - 1e-5, 1.0 - 1e-5]).double()
    # y = (x - mean) * w / sqrt(var + eps) + b, by hand
    assert torch.allclose(bn(x).flatten(), torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert torch.allclose(bn(x).flatten(), torch.tensor([0.5, 2.0], dtype=torch.float64))  # cached path
    bn.load_state_dict({"weight": torch.tensor([1.0, 1.0]), "bias": torch.zeros(2),
                        "running_mean": torch.zeros(2), "running_var": torch.full((2,), 1.0 - 1e-5)})
    assert torch.allclose(bn(x).flatten(), torch.ones(2, dtype=torch.float64))
    with torch.no_grad():
        bn.bias.add_(3.0)                                   # in place: the version counter moves
    assert torch.allclose(bn(x).flatten(), torch.full((2,), 4.0, dtype=torch.float64))
    assert bn.float()(x.float()).dtype == torch.float32      # .float() makes new buffers: recomputed


def test_frozen_bn_gradient_reaches_the_input_only():
    bn = _bn_with([2.0, 3.0], [0.0, 1.0], [0.0, 0.0], [1.0 - 1e-5, 1.0 - 1e-5]).double()
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    bn(x)                                                    # fills the cache with grad enabled
    torch.autograd.gradcheck(bn, (x,))
    bn(x).sum().backward()
    assert torch.allclose(x.grad[:, 0], torch.full((2, 3, 3), 2.0, dtype=torch.float64))
    assert all(b.grad is None for b in bn.buffers())


def test_group_norm_backbone_trains_every_layer_and_normalises():
    body = ResNetBody("resnet50", train_backbone=True, norm="group_norm")
    norms = [m for m in body.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 53 and not any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    assert all(p.requires_grad for p in body.parameters())   # stem and layer1 included
    frozen = ResNetBody("resnet50", train_backbone=True)
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if n.startswith(("body.conv1", "body.layer1.")))
    x = NestedTensor(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    out = body(x)
    assert [o.tensors.shape[1] for o in out] == [256, 512, 1024, 2048]
    assert all(torch.isfinite(o.tensors).all() for o in out)


def test_backbone_norm_config_errors(tmp_path):
    with pytest.raises(ValueError, match="MODEL.BACKBONE_NORM"):
        load_config("synthetic/devis_tiny.yaml", ["MODEL.BACKBONE_NORM", "batch"])
    with pytest.raises(ValueError, match="BACKBONE_WEIGHTS"):
        load_config("synthetic/devis_tiny.yaml", ["MODEL.BACKBONE_NORM", "group_norm",
                                                  "MODEL.BACKBONE_WEIGHTS", str(tmp_path / "r50.pth")])
    with pytest.raises(ValueError, match="expected one of"):
        ResNetBody("resnet50", norm="layer_norm")
