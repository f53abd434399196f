"""The README's main job: build the synthetic dataset, run the quickstart, train + evaluate the tiny DeVIS.

``python -m devis_core.main_job [--data-path data] [--out runs/main]`` (what ``make main`` runs). Each
notebook is executed with papermill into ``OUT/<name>.ipynb`` so the executed copies, with their
pictures, can be opened in Jupyter afterwards. The stored notebooks in ``notebooks/`` stay output-free.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"

# Dataset size of the main job: big enough to look like a VIS dataset, small enough for a 2-core CPU.
SYNTHETIC_SETTINGS = dict(num_videos=(24, 8), frames=(12, 24), size=(192, 320), num_categories=6,
                          objects=(2, 4), seed=0)


# Training budget of the main job on a 2-core CPU: a short schedule of the tiny DeVIS config, evaluated on
# the whole synthetic valid split at the end.
TRAIN_OVERRIDES = ("SOLVER.EPOCHS", "2", "SOLVER.STEPS", "[1]", "SOLVER.MAX_ITERS_PER_EPOCH", "30",
                   "TEST.EVAL_PERIOD", "2", "TEST.START_EVAL_EPOCH", "2", "TEST.VAL_LOSS_CLIPS", "8",
                   "VISDOM_AND_LOG_INTERVAL", "5")


def run_notebook(name: str, out_dir: Path, parameters: dict, cwd: Path) -> Path:
    """Execute ``notebooks/<name>.ipynb`` with papermill; returns the executed copy's path."""
    import papermill as pm

    src = NOTEBOOKS_DIR / f"{name}.ipynb"
    if not src.is_file():
        raise FileNotFoundError(f"notebook {src} is missing from the checkout")
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / f"{name}.ipynb"
    tmp = out_dir / f".{name}.running.ipynb"
    pm.execute_notebook(str(src), str(tmp), parameters=parameters, kernel_name="python3", cwd=str(cwd),
                        progress_bar=False)
    os.replace(tmp, dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    """Generate the synthetic data (reused when already complete), run the quickstart notebook, then the
    training notebook (tiny DeVIS: train, evaluate, curves, predicted clips)."""
    from devis_core.data.synthetic import make_synthetic_vis

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", default="data", help="DATASETS.DATA_PATH for the synthetic dataset")
    parser.add_argument("--out", default="runs/main", help="folder for the executed notebooks")
    args = parser.parse_args(argv)

    data_path = Path(args.data_path).resolve()
    out = Path(args.out).resolve()
    t0 = time.time()
    paths = make_synthetic_vis(data_path, name="synthetic_vis", **SYNTHETIC_SETTINGS)
    print(f"[main] synthetic dataset ready under {data_path} ({time.time() - t0:.1f} s): {paths}")

    s = SYNTHETIC_SETTINGS
    params = dict(data_path=str(data_path), dataset_name="synthetic_vis",
                  num_videos_train=s["num_videos"][0], num_videos_valid=s["num_videos"][1],
                  frames_min=s["frames"][0], frames_max=s["frames"][1], height=s["size"][0],
                  width=s["size"][1], num_categories=s["num_categories"], seed=s["seed"])
    t0 = time.time()
    nb = run_notebook("00_quickstart", out, params, cwd=REPO_ROOT)
    print(f"[main] executed {nb} ({time.time() - t0:.1f} s)")

    t0 = time.time()
    train_params = dict(config_file="synthetic/devis_tiny.yaml", overrides=list(TRAIN_OVERRIDES),
                        output_dir=str(out / "devis_tiny"), data_path=str(data_path), num_gpus=1, resume=False,
                        num_clips_to_show=3)
    nb = run_notebook("train", out, train_params, cwd=REPO_ROOT)
    print(f"[main] trained and evaluated the tiny DeVIS: {nb} ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
