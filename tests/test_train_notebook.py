"""notebooks/train.ipynb runs end to end through papermill on tiny synthetic data (one process, CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from devis_core.data.synthetic import make_synthetic_vis

REPO = Path(__file__).resolve().parents[1]


def test_train_notebook_trains_evaluates_and_draws(tmp_path):
    pm = pytest.importorskip("papermill")
    make_synthetic_vis(str(tmp_path / "data"), num_videos=(2, 1), frames=(4, 4), size=(64, 96), num_categories=3,
                       objects=(1, 2), seed=0)
    out = tmp_path / "run"
    overrides = ["MODEL.HIDDEN_DIM", "128", "MODEL.DIM_FEEDFORWARD", "64", "MODEL.TRANSFORMER.ENCODER_LAYERS", "1",
                 "MODEL.NUM_QUERIES", "8", "MODEL.DEVIS.NUM_FRAMES", "2", "TEST.NUM_OUT", "4",
                 "TEST.CLIP_TRACKING.STRIDE", "1", "TEST.VAL_LOSS_CLIPS", "1", "NUM_WORKERS", "0",
                 "INPUT.SCALE_FACTOR_TRAIN", "0.15", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
                 "SOLVER.EPOCHS", "1", "SOLVER.MAX_ITERS_PER_EPOCH", "2"]
    executed = tmp_path / "train.ipynb"
    pm.execute_notebook(str(REPO / "notebooks" / "train.ipynb"), str(executed), cwd=str(REPO), kernel_name="python3",
                        progress_bar=False,
                        parameters=dict(config_file="synthetic/devis_tiny.yaml", overrides=overrides,
                                        output_dir=str(out), data_path=str(tmp_path / "data"), num_gpus=1,
                                        num_clips_to_show=1))
    nb = json.loads(executed.read_text())
    pngs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
    assert len(pngs) >= 3  # live curves, final curves, one clip with predicted masks
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "'AP'" in text and "val_loss" in text
    kinds = [json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert kinds[-1] == "done" and "eval" in kinds
