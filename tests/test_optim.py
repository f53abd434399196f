"""Parameter groups, frozen parameters and the epoch schedule of devis_core/optim.py (spec §6.5)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from devis_core.config import load_config
from devis_core.optim import build_optimizer, build_scheduler, freeze_parameters, param_groups


class Toy(nn.Module):
    """Names shaped like the real model's, one parameter per official group."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.ModuleList([nn.Linear(2, 2, bias=False)])            # backbone.0.weight
        self.cross_attn = nn.Module()
        self.cross_attn.sampling_offsets = nn.Linear(2, 2, bias=False)          # linear projection
        self.temporal_sampling_offsets = nn.Linear(2, 2, bias=False)            # temporal projection
        self.mask_head = nn.Linear(2, 2, bias=False)                            # mask head
        self.class_embed = nn.Linear(2, 2, bias=False)                          # base
        self.query_embed = nn.Embedding(3, 2)                                   # base


def test_five_groups_with_official_learning_rates():
    cfg = load_config(None, ["SOLVER.BASE_LR", "0.001", "SOLVER.LR_BACKBONE", "0.0001",
                             "SOLVER.LR_MASK_HEAD_MULT", "10"])
    opt = build_optimizer(cfg, Toy())
    names = [g["param_names"] for g in opt.param_groups]
    assert names == [["class_embed.weight", "query_embed.weight"], ["backbone.0.weight"],
                     ["cross_attn.sampling_offsets.weight"], ["mask_head.weight"],
                     ["temporal_sampling_offsets.weight"]]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-4, 1e-4, 1e-2, 1e-4])
    assert all(g["weight_decay"] == pytest.approx(1e-4) for g in opt.param_groups)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


def test_frozen_parameters_leave_every_group_and_unknown_keyword_fails():
    model = Toy()
    frozen = freeze_parameters(model, ["class_embed"])
    assert frozen == ["class_embed.weight"] and not model.class_embed.weight.requires_grad
    groups = param_groups(model, 1.0, 0.1, ["backbone.0"], ["sampling_offsets"], 0.1, ["mask_head"], 1.0,
                          ["temporal_sampling_offsets"], 0.1)
    assert all("class_embed.weight" not in g["param_names"] for g in groups)
    # "sampling_offsets" also matches temporal_sampling_offsets: the first matching group wins (official order)
    assert groups[2]["param_names"] == ["cross_attn.sampling_offsets.weight", "temporal_sampling_offsets.weight"]
    with pytest.raises(ValueError, match="FROZEN_PARAMS: 'nonexistent'"):
        freeze_parameters(model, ["nonexistent"])


def test_multistep_schedule_decays_after_the_milestone_epoch():
    cfg = load_config(None, ["SOLVER.BASE_LR", "0.001", "SOLVER.STEPS", "[2, 3]"])
    opt = build_optimizer(cfg, Toy())
    sched = build_scheduler(cfg, opt)
    seen = []
    for _epoch in (1, 2, 3, 4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # epochs 1, 2 at 1e-3; epoch 3 (> milestone 2) at 1e-4; epoch 4 (> 3) at 1e-5
    assert seen == pytest.approx([1e-3, 1e-3, 1e-4, 1e-5])


def test_real_devis_model_groups_match_spec_table():
    from devis_core.models import build_model

    cfg = load_config(None, ["DATASETS.TYPE", "vis", "SOLVER.BATCH_SIZE", "1", "MODEL.DEVIS.NUM_FRAMES", "2",
                             "MODEL.NUM_QUERIES", "4", "MODEL.HIDDEN_DIM", "128", "MODEL.DIM_FEEDFORWARD", "32",
                             "MODEL.TRANSFORMER.ENCODER_LAYERS", "1", "MODEL.TRANSFORMER.DECODER_LAYERS", "2",
                             "MODEL.LOSS.MASK_AUX_LOSS", "[0]"])
    model = build_model(cfg, 3, load_weights=False)
    opt = build_optimizer(cfg, model)
    base, backbone, proj, mask, temporal = (g["param_names"] for g in opt.param_groups)
    assert backbone and all("backbone.0" in n for n in backbone)
    assert proj and all(("sampling_offsets" in n and "temporal" not in n) or "reference_points" in n for n in proj)
    assert mask and all(n.startswith(("bbox_attention", "mask_head")) for n in mask)
    assert temporal and all("temporal_sampling_offsets" in n for n in temporal)
    assert any("temporal_embed" in n for n in base) and any("query_embed" in n for n in base)
    trainable = sum(p.requires_grad for p in model.parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == trainable


def test_fused_adamw_is_opt_in_and_needs_cuda_parameters():
    from devis_core.optim import adamw_kernel
    cfg = load_config(None, [], freeze=False)
    assert not build_optimizer(cfg, Toy()).defaults.get("fused")          # default: the foreach kernel
    cfg.SOLVER.FUSED_ADAMW = True
    with pytest.raises(ValueError, match="SOLVER.FUSED_ADAMW=True needs every parameter on a CUDA device"):
        build_optimizer(cfg, Toy())
    assert adamw_kernel(False, Toy()) == {}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_adamw_steps_like_the_default_within_rounding():
    cfg = load_config(None, [], freeze=False)
    models = [Toy().cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    cfg.SOLVER.FUSED_ADAMW = True
    fused = build_optimizer(cfg, models[1])
    cfg.SOLVER.FUSED_ADAMW = False
    plain = build_optimizer(cfg, models[0])
    assert fused.defaults["fused"] and not plain.defaults.get("fused")
    for _ in range(3):
        for model, opt in zip(models, (plain, fused)):
            opt.zero_grad()
            sum((p ** 2).sum() for p in model.parameters()).backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
