"""The training engine end to end on CPU: loss goes down through train_one_epoch, 2-process gloo run equals
one process, NaN handling, bfloat16 autocast, evaluation during training with the best checkpoint."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from devis_core.config import load_config
from devis_core.criterion import build_criterion
from devis_core.data.synthetic import make_synthetic_coco, make_synthetic_vis
from devis_core.engine import NonFiniteLossError, compute_losses, train_one_epoch
from devis_core.logging_utils import read_json_lines
from devis_core.models import build_model
from devis_core.optim import build_optimizer
from devis_core.train import train

REPO = Path(__file__).resolve().parents[1]
TINY = ["MODEL.HIDDEN_DIM", "128", "MODEL.DIM_FEEDFORWARD", "64", "MODEL.TRANSFORMER.ENCODER_LAYERS", "1",
        "MODEL.TRANSFORMER.DECODER_LAYERS", "2", "MODEL.DROPOUT", "0.0", "NUM_WORKERS", "0", "VISDOM_ON", "False",
        "DEVICE", "cpu", "INPUT.SCALE_FACTOR_TRAIN", "0.15", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("train_data")
    make_synthetic_coco(str(root), num_images=(6, 3), size=(64, 96), num_categories=3, objects=(1, 2), seed=0)
    make_synthetic_vis(str(root), num_videos=(2, 1), frames=(4, 4), size=(64, 96), num_categories=3,
                       objects=(1, 2), seed=0)
    return str(root)


def detr_args(data_path: str, out: Path, *extra: str) -> list[str]:
    return ["--config-file", "synthetic/deformable_detr_tiny.yaml", *TINY, "MODEL.NUM_QUERIES", "8",
            "TEST.NUM_OUT", "5", "DATASETS.DATA_PATH", data_path, "OUTPUT_DIR", str(out), *extra]


def test_train_one_epoch_lowers_the_loss_on_a_fixed_batch():
    from tests.test_optimisation_step import _image_batch

    torch.manual_seed(0)
    cfg = load_config(None, TINY + ["MODEL.NUM_QUERIES", "8", "SOLVER.BASE_LR", "0.001", "SOLVER.LR_BACKBONE", "0.0001"])
    model = build_model(cfg, 4, load_weights=False)
    criterion = build_criterion(cfg, 4)
    batch = _image_batch()
    with torch.no_grad():
        before = float(compute_losses(model.eval(), criterion, *batch)[0])
    stats = train_one_epoch(model, criterion, [batch] * 4, build_optimizer(cfg, model), torch.device("cpu"), 1,
                            cfg.SOLVER.GRAD_CLIP_MAX_NORM)
    with torch.no_grad():
        after = float(compute_losses(model.eval(), criterion, *batch)[0])
    assert stats["iterations"] == 4 and stats["skipped_steps"] == 0
    assert 0 < stats["grad_norm"] and math.isfinite(stats["loss"])
    assert after < before * 0.95, (before, after)


def _first_loss(out: Path) -> float:
    recs = [r for r in read_json_lines(out / "metrics.jsonl") if r["kind"] == "train_iter"]
    return recs[0]["train_loss"]


def test_two_process_gloo_run_matches_one_process(data_path, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    common = ["SOLVER.EPOCHS", "1", "SOLVER.MAX_ITERS_PER_EPOCH", "1", "TEST.EVAL_PERIOD", "0", "SEED", "7"]
    one = subprocess.run([sys.executable, "-m", "devis_core.train",
                          *detr_args(data_path, tmp_path / "one", *common, "SOLVER.BATCH_SIZE", "2")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "devis_core.train",
                          *detr_args(data_path, tmp_path / "two", *common, "SOLVER.BATCH_SIZE", "1")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    rec = read_json_lines(tmp_path / "two" / "metrics.jsonl")
    assert rec[-1]["kind"] == "done"
    assert [r for r in rec if r["kind"] == "train_epoch"][0]["train_world_size"] == 2
    # only rank 0 writes: one line per event, not two
    assert sum(r["kind"] == "train_epoch" for r in rec) == 1
    # global batch of 2 either way: mean over ranks of per-rank losses (each normalised by the global
    # box count) equals the single-process loss of the same two augmented samples
    assert _first_loss(tmp_path / "two") == pytest.approx(_first_loss(tmp_path / "one"), rel=2e-3)


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(data_path, tmp_path, monkeypatch):
    from devis_core.criterion import SetCriterion

    real = SetCriterion.total_loss
    calls = {"n": 0}

    def poisoned(self, losses):
        calls["n"] += 1
        value = real(self, losses)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(SetCriterion, "total_loss", poisoned)
    out = tmp_path / "nan"
    cfg = load_config(detr_args(data_path, out)[1],
                      detr_args(data_path, out)[2:] + ["SOLVER.EPOCHS", "2", "SOLVER.MAX_ITERS_PER_EPOCH", "2",
                                                       "TEST.EVAL_PERIOD", "0"])
    with pytest.raises(NonFiniteLossError, match="epoch 2, iteration 0: the loss is not finite"):
        train(cfg)
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (state["epoch"], state["iteration"], state["epoch_complete"]) == (1, 2, True)
    for v in state["model"].values():
        assert torch.isfinite(v).all()

    calls["n"] = 0
    out2 = tmp_path / "skip"
    cfg2 = load_config(detr_args(data_path, out2)[1],
                       detr_args(data_path, out2)[2:] + ["SOLVER.EPOCHS", "2", "SOLVER.MAX_ITERS_PER_EPOCH", "2",
                                                         "TEST.EVAL_PERIOD", "0", "SOLVER.SKIP_NONFINITE_STEPS", "True"])
    summary = train(cfg2)
    assert summary["last_train"]["skipped_steps"] == 1 and summary["last_train"]["iterations"] == 1
    kinds = [r["kind"] for r in read_json_lines(out2 / "metrics.jsonl")]
    assert kinds.count("skipped_step") == 1 and kinds[-1] == "done"


def test_bfloat16_autocast_loss_within_noise_of_float32():
    from tests.test_optimisation_step import _image_batch

    torch.manual_seed(0)
    cfg = load_config(None, TINY + ["MODEL.NUM_QUERIES", "8"])
    model = build_model(cfg, 4, load_weights=False).eval()
    criterion = build_criterion(cfg, 4)
    batch = _image_batch()
    with torch.no_grad():
        fp32 = float(compute_losses(model, criterion, *batch, amp=False)[0])
        bf16 = float(compute_losses(model, criterion, *batch, amp=True)[0])
    assert bf16 != fp32  # autocast really changed the arithmetic
    assert bf16 == pytest.approx(fp32, rel=0.03)


@pytest.mark.parametrize("kind", ["coco", "vis"])
def test_evaluation_during_training_logs_ap_val_loss_and_keeps_best(kind, data_path, tmp_path):
    out = tmp_path / kind
    if kind == "coco":
        args = detr_args(data_path, out)
    else:
        args = ["--config-file", "synthetic/devis_tiny.yaml", *TINY, "MODEL.NUM_QUERIES", "8",
                "MODEL.DEVIS.NUM_FRAMES", "2", "TEST.NUM_OUT", "4", "TEST.VAL_LOSS_CLIPS", "1", "TEST.CLIP_TRACKING.STRIDE", "1",
                "DATASETS.DATA_PATH", data_path, "OUTPUT_DIR", str(out)]
    cfg = load_config(args[1], args[2:] + ["SOLVER.EPOCHS", "1", "SOLVER.MAX_ITERS_PER_EPOCH", "1"])
    seen = []
    summary = train(cfg, callbacks=[seen.append])
    evals = [r for r in read_json_lines(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["epoch"] == 1
    assert 0.0 <= evals[0]["AP"] <= 1.0 and math.isfinite(evals[0]["val_loss"]) and evals[0]["val_loss"] > 0
    if kind == "coco":
        assert "bbox_AP50" in evals[0]
    else:
        assert (out / "eval_epoch_1" / cfg.TEST.SAVE_PATH / "results.json").is_file()
    best = torch.load(out / "checkpoint_best.pth", weights_only=True)
    assert best["best"] == {"AP": evals[0]["AP"], "epoch": 1} == summary["best"]
    assert [r["kind"] for r in seen] == [r["kind"] for r in read_json_lines(out / "metrics.jsonl")]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["kind"] == "done"


def test_read_losses_is_one_transfer_of_the_same_floats():
    from devis_core.engine import _read_losses
    losses = {"loss_ce": torch.tensor(0.1, dtype=torch.float32), "loss_bbox": torch.tensor(0.3, dtype=torch.float64),
              "class_error": torch.tensor(25.0), "loss_unweighted": torch.tensor(7.0)}
    weights = {"loss_ce": 2.0, "loss_bbox": 5.0}
    total = losses["loss_ce"] * 2.0 + losses["loss_bbox"] * 5.0
    value, terms = _read_losses(total, losses, weights)
    assert value == float(total)
    assert terms == {"loss_ce": float(losses["loss_ce"]) * 2.0, "loss_bbox": float(losses["loss_bbox"]) * 5.0,
                     "class_error": 25.0}
