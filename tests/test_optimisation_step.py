"""A few AdamW steps on one fixed batch lower the weighted loss, for each model kind (CPU, tiny shapes)."""
from __future__ import annotations

import pytest
import torch

from devis_core.config import load_config
from devis_core.criterion import build_criterion
from devis_core.models import build_model, nested_tensor_from_tensor_list
from devis_core.models.nested import NestedTensor

TINY = ["MODEL.HIDDEN_DIM", "128", "MODEL.NUM_QUERIES", "8", "MODEL.DIM_FEEDFORWARD", "64",
        "MODEL.TRANSFORMER.ENCODER_LAYERS", "1", "MODEL.TRANSFORMER.DECODER_LAYERS", "2",
        "MODEL.DROPOUT", "0.0", "MODEL.LOSS.MASK_AUX_LOSS", "[0]"]


def _image_batch():
    g = torch.Generator().manual_seed(0)
    samples = nested_tensor_from_tensor_list([torch.randn(3, 48, 64, generator=g), torch.randn(3, 40, 56, generator=g)])
    m0 = torch.zeros(1, 48, 64, dtype=torch.bool)
    m0[0, 12:36, 16:48] = True
    m1 = torch.zeros(1, 40, 56, dtype=torch.bool)
    m1[0, 8:24, 8:32] = True
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]]), "masks": m0},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.36, 0.4, 0.43, 0.4]]), "masks": m1}]
    return samples, targets


def _clip_batch(t: int = 2):
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(t, 3, 40, 56, generator=g)
    masks = torch.zeros(t, 40, 56, dtype=torch.bool)
    masks[:, 10:30, 14:42] = True
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]] * t), "labels": torch.tensor([1] * t),
                "valid": torch.ones(t, dtype=torch.long), "masks": masks,
                "size": torch.tensor([40, 56]), "orig_size": torch.tensor([40, 56])}]
    return NestedTensor(frames, torch.zeros(t, 40, 56, dtype=torch.bool)), targets


@pytest.mark.parametrize("kind", ["deformable_detr", "mask_head", "devis"])
def test_adamw_steps_lower_the_loss_on_a_fixed_batch(kind):
    torch.manual_seed(0)
    extra = {"deformable_detr": [],
             "mask_head": ["MODEL.MASK_ON", "True"],
             "devis": ["DATASETS.TYPE", "vis", "SOLVER.BATCH_SIZE", "1", "MODEL.DEVIS.NUM_FRAMES", "2",
                       "MODEL.NUM_QUERIES", "8"]}[kind]
    cfg = load_config(None, TINY + extra)
    model = build_model(cfg, 4, load_weights=False).train()
    criterion = build_criterion(cfg, 4)
    samples, targets = _clip_batch() if kind == "devis" else _image_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)

    def step() -> float:
        opt.zero_grad()
        loss = criterion.total_loss(criterion(model(samples, targets), targets))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt.step()
        return float(loss)

    losses = [step() for _ in range(4)]
    with torch.no_grad():
        final = float(criterion.total_loss(criterion(model(samples, targets), targets)))
    assert all(map(lambda v: v == v and v < float("inf"), losses))
    assert final < losses[0] * 0.95, f"{kind}: loss did not go down: {losses} -> {final}"
