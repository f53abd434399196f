"""Official-parity tests: every fixture in tests/fixtures/parity/ (and $DEVIS_PARITY_FIXTURES) is run through
our implementation and compared with the numbers the official DeVIS code produced (shared/parity/README.md).

A fixture whose ``kind`` has no runner here fails (it is never skipped), so a new fixture cannot pass silently.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from devis_core.config import load_config
from devis_core.testing import checksum, fixture_clip, fixture_images, regenerated_state_dict

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "parity"


def _fixture_files() -> list[Path]:
    files = sorted(FIXTURE_DIR.glob("*.pt"))
    extra = os.environ.get("DEVIS_PARITY_FIXTURES")
    if extra:
        files += sorted(Path(extra).glob("*.pt"))
    return files


# README tolerances: relative to the largest magnitude of each expected tensor.
TOLERANCE = {"float64": {"tensor": 1e-9, "mask": 1e-9, "loss": 1e-9},
             "float32": {"tensor": 1e-4, "mask": 1e-3, "loss": 1e-5}}


def assert_close_rel(name: str, ours: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    assert tuple(ours.shape) == tuple(expected.shape), f"{name}: shape {tuple(ours.shape)} vs {tuple(expected.shape)}"
    ours = ours.detach().cpu().to(torch.float64)
    expected = expected.to(torch.float64)
    err = float((ours - expected).abs().max())
    scale = float(expected.abs().max())
    assert err <= rel * scale, f"{name}: max |ours - expected| = {err:.3e} > {rel:g} * {scale:.3e}"


def check_checksums(state_dict: dict, checksums: dict) -> None:
    """The regenerated weights must reproduce the fixture's (sum, sum |.|) for every official key."""
    assert set(state_dict) == set(checksums), (
        f"keys differ: missing {sorted(set(checksums) - set(state_dict))[:5]}, "
        f"extra {sorted(set(state_dict) - set(checksums))[:5]}")
    for k, (s, a) in checksums.items():
        ours_s, ours_a = checksum(state_dict[k])
        assert abs(ours_s - s) <= 1e-9 * max(1.0, a) and abs(ours_a - a) <= 1e-9 * max(1.0, a), (
            f"checksum of {k}: ours ({ours_s}, {ours_a}) vs fixture ({s}, {a})")


def build_with_official_weights(fx: dict, device: str, dtype: torch.dtype):
    """The fixture's config and model, with the regenerated official weights loaded through the
    official-checkpoint path (official names -> conversion -> strict load) after checking their checksums."""
    from devis_core.checkpoint import check_state_dict, convert_state_dict
    from devis_core.models import build_model

    cfg = load_config(fx["yaml"], fx["overrides"])
    model = build_model(cfg, fx["num_classes"], load_weights=False)
    official = regenerated_state_dict({k: v.shape for k, v in model.state_dict().items()}, fx["seed"])
    check_checksums(official, fx["checksums"])
    source = f"regenerated official {fx['kind']} weights"
    sd = convert_state_dict(model, official, source=source)
    check_state_dict(model, sd, source)
    model.load_state_dict(sd, strict=True)
    return cfg, model.to(device=device, dtype=dtype)


def check_losses(fx: dict, cfg, out: dict, targets: list, rel: float) -> None:
    """Our criterion on the model's training outputs against the fixture's loss dict, weights and total."""
    from devis_core.criterion import build_criterion

    criterion = build_criterion(cfg, fx["num_classes"])
    losses = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in criterion(out, targets).items()}
    assert set(losses) == set(fx["losses"]), f"loss keys: ours {sorted(losses)} vs {sorted(fx['losses'])}"
    for k, v in fx["losses"].items():
        assert abs(float(losses[k]) - v) <= rel * max(abs(v), 1e-12), f"{k}: ours {float(losses[k])} vs {v}"
    assert criterion.weight_dict == fx["loss_weights"]
    total = float(criterion.total_loss(losses))
    assert abs(total - fx["loss_total"]) <= rel * abs(fx["loss_total"])


def run_maskhead(fx: dict, device: str = "cpu", dtype_name: str | None = None) -> None:
    from devis_core.models import nested_tensor_from_tensor_list

    # The fixture was computed in float64; a float32 run (e.g. the CUDA kernel) uses the README's float32 bounds.
    dtype_name = dtype_name or fx["dtype"]
    dtype = getattr(torch, dtype_name)
    tol = TOLERANCE[dtype_name]
    cfg, model = build_with_official_weights(fx, device, dtype)

    samples = nested_tensor_from_tensor_list([im.to(dtype) for im in fixture_images(fx["seed_input"],
                                                                                    fx["image_sizes"])]).to(device)
    exp = fx["expected"]
    model.eval()
    with torch.no_grad():
        feats = model.def_detr.forward_features(samples)
        out = model.def_detr.predict(feats)
        top = model(samples)["topk"]
    for lvl, mem in enumerate(exp["memories"]):
        assert_close_rel(f"memories[{lvl}]", feats["memories"][lvl], mem, tol["tensor"])
    for name in ("hs", "init_reference", "inter_references"):
        assert_close_rel(name, feats[name], exp[name], tol["tensor"])
    layers = [*out["aux_outputs"], out]
    assert len(layers) == exp["pred_logits"].shape[0]
    for i, layer in enumerate(layers):
        assert_close_rel(f"pred_logits[{i}]", layer["pred_logits"], exp["pred_logits"][i], tol["tensor"])
        assert_close_rel(f"pred_boxes[{i}]", layer["pred_boxes"], exp["pred_boxes"][i], tol["tensor"])
    assert torch.equal(top["labels"].cpu(), exp["topk_labels"]), "top-k labels differ"
    assert torch.equal(top["query_indexes"].cpu(), exp["topk_query_indexes"]), "top-k query indexes differ"
    assert_close_rel("topk_scores", top["scores"], exp["topk_scores"], tol["tensor"])
    # The README calls these xyxy, but the stored values are the official ``pre_computed_results['boxes']``:
    # the selected queries' normalised cx, cy, w, h (checked: they equal pred_boxes at topk_query_indexes).
    gathered = torch.gather(exp["pred_boxes"][-1], 1, exp["topk_query_indexes"][..., None].expand(-1, -1, 4))
    assert torch.equal(gathered, exp["topk_boxes_normalized"])
    assert_close_rel("topk_boxes_normalized", top["boxes"], exp["topk_boxes_normalized"], tol["tensor"])
    assert_close_rel("topk_mask_logits", top["masks"], exp["topk_mask_logits"], tol["mask"])

    # Training forward (dropout 0 in the fixture): matcher inside the model, then the official losses.
    model.train()
    targets = [{k: ((v.to(dtype) if v.is_floating_point() else v).to(device) if torch.is_tensor(v) else v)
                for k, v in t.items()} for t in fx["targets"]]
    out = model(samples, targets)
    for b, ((src, tgt), (esrc, etgt)) in enumerate(zip(out["indices"], fx["matcher_indices"])):
        assert torch.equal(src.cpu(), esrc) and torch.equal(tgt.cpu(), etgt), f"matcher indices of image {b} differ"
    check_losses(fx, cfg, out, targets, tol["loss"])


def run_devis(fx: dict, device: str = "cpu", dtype_name: str | None = None) -> None:
    from devis_core.models.nested import NestedTensor

    # The fixture was computed in float64; a float32 run (e.g. the CUDA kernel) uses the README's float32 bounds.
    dtype_name = dtype_name or fx["dtype"]
    dtype = getattr(torch, dtype_name)
    tol = TOLERANCE[dtype_name]
    cfg, model = build_with_official_weights(fx, device, dtype)

    clip = fixture_clip(fx["seed_input"], fx["input_shape"]).to(device=device, dtype=dtype)
    samples = NestedTensor(clip, torch.zeros(clip.shape[0], *clip.shape[-2:], dtype=torch.bool, device=clip.device))
    exp = fx["expected"]
    model.eval()
    with torch.no_grad():
        feats = model.def_detr.forward_features(samples)
        out = model.def_detr.predict(feats)
        n_slots = model.num_slots
        masks_all = model.trajectory_masks(feats, torch.arange(n_slots))
        post = model.inference(samples, fx["tgt_size"], fx["clip_length"])
    assert torch.equal(feats["spatial_shapes"].cpu(), exp["spatial_shapes"])
    for name in ("memory", "hs", "init_reference", "inter_references"):
        assert_close_rel(name, feats[name], exp[name], tol["tensor"])
    layers = [*out["aux_outputs"], out]
    assert len(layers) == exp["pred_logits"].shape[0]
    for i, layer in enumerate(layers):
        assert_close_rel(f"pred_logits[{i}]", layer["pred_logits"], exp["pred_logits"][i], tol["tensor"])
        assert_close_rel(f"pred_boxes[{i}]", layer["pred_boxes"], exp["pred_boxes"][i], tol["tensor"])
    assert_close_rel("mask_logits_all", masks_all, exp["mask_logits_all"], tol["mask"])
    ep = fx["postprocessed"]
    for name in ("labels", "top_k_idxs", "inverse_idxs"):
        assert torch.equal(post[name].cpu(), ep[name]), f"postprocessed {name} differ"
    for name in ("scores", "boxes", "center_points"):
        assert_close_rel(f"postprocessed {name}", post[name], ep[name], tol["tensor"])
    assert_close_rel("postprocessed masks", post["masks"], ep["masks"], tol["mask"])

    # Training forward (dropout 0): the clip matcher inside the model, then the official losses.
    model.train()
    targets = [{k: ((v.to(dtype) if v.is_floating_point() else v).to(device) if torch.is_tensor(v) else v)
                for k, v in t.items()} for t in fx["targets"]]
    out = model(samples, targets)
    (src, tgt), = out["indices"]
    (esrc, etgt, evalid), = fx["matcher_indices"]
    assert torch.equal(src.cpu(), esrc) and torch.equal(tgt.cpu(), etgt), "clip matcher indices differ"
    assert torch.equal(targets[0]["valid"][tgt].bool().cpu(), evalid.bool()), "matched valid flags differ"
    check_losses(fx, cfg, out, targets, tol["loss"])


def run_tracker(fx: dict) -> None:
    from parity_tracker import check_tracker_fixture

    check_tracker_fixture(fx)


RUNNERS = {"maskhead": run_maskhead, "devis": run_devis, "tracker": run_tracker}


@pytest.mark.parametrize("path", _fixture_files(), ids=lambda p: p.name)
def test_parity_fixture(path: Path):
    fx = torch.load(path, weights_only=True)
    kind = fx.get("kind")
    if kind not in RUNNERS:
        pytest.fail(f"{path}: parity fixture kind {kind!r} has no runner yet (supported: {sorted(RUNNERS)})")
    RUNNERS[kind](fx)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("path", [p for p in _fixture_files()
                                  if torch.load(p, weights_only=True)["kind"] in ("maskhead", "devis")],
                         ids=lambda p: p.name)
def test_parity_fixture_cuda_float32(path: Path):
    """The same check on the GPU in float32, through the fused CUDA attention kernel (README float32 bounds)."""
    fx = torch.load(path, weights_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    RUNNERS[fx["kind"]](fx, device="cuda", dtype_name="float32")


def test_fixture_directory_holds_every_kind():
    kinds = {torch.load(p, weights_only=True)["kind"] for p in _fixture_files()}
    assert kinds >= {"maskhead", "devis", "tracker"}


def test_checksum_check_catches_a_wrong_weight():
    fx = torch.load(FIXTURE_DIR / "maskhead_public.pt", weights_only=True)
    keys = list(fx["checksums"])[:3]
    shapes = {"def_detr.transformer.level_embed": (4, 256)}
    sd = regenerated_state_dict(shapes, fx["seed"])
    check_checksums(sd, {k: fx["checksums"][k] for k in shapes})
    sd["def_detr.transformer.level_embed"] = sd["def_detr.transformer.level_embed"] * 1.001
    with pytest.raises(AssertionError, match="checksum of def_detr.transformer.level_embed"):
        check_checksums(sd, {k: fx["checksums"][k] for k in shapes})
    assert keys  # the fixture stores checksums at all
