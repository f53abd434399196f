"""MODEL.TRANSFORMER.CHECKPOINT_ENCODER_LAYERS: recomputing encoder layers in the backward changes nothing."""
import pytest
import torch

from devis_core.benchmarks.model import synthetic_clip
from devis_core.config import load_config
from devis_core.criterion import build_criterion
from devis_core.engine import compute_losses
from devis_core.models import build_model


def _loss_and_grads(layers: int):
    # the tiny config has two encoder layers
    cfg = load_config("synthetic/devis_tiny.yaml", ["MODEL.TRANSFORMER.CHECKPOINT_ENCODER_LAYERS", str(layers),
                                                   "MODEL.DROPOUT", "0.3"])
    torch.manual_seed(0)
    model = build_model(cfg, 6, load_weights=False).double().train()
    criterion = build_criterion(cfg, 6).double()
    calls = [0, 0]
    for i, layer in enumerate(model.def_detr.transformer.encoder.layers):
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    samples, targets = synthetic_clip(3, (48, 64), 2, 6, seed=1)
    samples = samples.to(torch.float64)
    targets = [{k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in t.items()}
               for t in targets]
    torch.manual_seed(1)                        # the same dropout masks in every run
    loss, _ = compute_losses(model, criterion, samples, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, calls


@pytest.mark.parametrize("layers, expected_calls", [(1, [2, 1]), (-1, [2, 2])])
def test_checkpointed_encoder_layers_give_the_same_loss_and_gradients(layers, expected_calls):
    plain_loss, plain, plain_calls = _loss_and_grads(0)
    ckpt_loss, ckpt, ckpt_calls = _loss_and_grads(layers)
    assert plain_calls == [1, 1]
    assert ckpt_calls == expected_calls            # the backward really recomputed those layers, only those
    assert torch.equal(plain_loss, ckpt_loss)
    assert plain.keys() == ckpt.keys() and any("encoder" in n for n in plain)
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, rtol=1e-12, atol=1e-14, msg=name)


def test_too_many_checkpointed_layers_is_a_clear_error():
    cfg = load_config("synthetic/devis_tiny.yaml", ["MODEL.TRANSFORMER.CHECKPOINT_ENCODER_LAYERS", "3"])
    with pytest.raises(ValueError, match=r"CHECKPOINT_ENCODER_LAYERS is 3; expected -1 \(all\) or 0..2"):
        build_model(cfg, 6, load_weights=False)
