"""MODEL.TRANSFORMER.CHECKPOINT_ENCODER: recomputing the encoder in the backward changes nothing."""
import torch

from devis_core.benchmarks.model import synthetic_clip
from devis_core.config import load_config
from devis_core.criterion import build_criterion
from devis_core.engine import compute_losses
from devis_core.models import build_model


def _loss_and_grads(checkpoint: bool):
    cfg = load_config("synthetic/devis_tiny.yaml", ["MODEL.TRANSFORMER.CHECKPOINT_ENCODER", str(checkpoint),
                                                   "MODEL.DROPOUT", "0.3"])
    torch.manual_seed(0)
    model = build_model(cfg, 6, load_weights=False).double().train()
    criterion = build_criterion(cfg, 6).double()
    calls = []
    model.def_detr.transformer.encoder.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    samples, targets = synthetic_clip(3, (48, 64), 2, 6, seed=1)
    samples = samples.to(torch.float64)
    targets = [{k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in t.items()}
               for t in targets]
    torch.manual_seed(1)                        # the same dropout masks in both runs
    loss, _ = compute_losses(model, criterion, samples, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return model, loss.detach(), grads, len(calls)


def test_checkpointed_encoder_gives_the_same_loss_and_gradients():
    plain_model, plain_loss, plain, plain_calls = _loss_and_grads(False)
    ckpt_model, ckpt_loss, ckpt, ckpt_calls = _loss_and_grads(True)
    assert ckpt_model.def_detr.transformer.encoder.checkpoint and not plain_model.def_detr.transformer.encoder.checkpoint
    assert (plain_calls, ckpt_calls) == (1, 2)              # the backward really recomputed the layer
    assert torch.equal(plain_loss, ckpt_loss)
    assert plain.keys() == ckpt.keys() and any("encoder" in n for n in plain)
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, rtol=1e-12, atol=1e-14, msg=name)
