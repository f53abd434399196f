"""notebooks/inspect_results.ipynb: stored clean, and runs under papermill on CPU with tiny parameters
(tiny DeVIS config, random weights, tiny synthetic videos)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import nbformat
import papermill
import pytest

from devis_core.data.synthetic import make_synthetic_vis
from notebook_checks import assert_stored_clean

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "inspect_results.ipynb"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
PARAMETERS = ("config_file", "weights", "data_path", "dataset", "results_file", "max_videos", "out_dir",
              "score_threshold", "device", "seed")


def test_inspect_notebook_is_stored_clean():
    assert_stored_clean(NOTEBOOK, PARAMETERS)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_inspect_notebook_runs_on_cpu(tmp_path):
    data_path = tmp_path / "data"
    make_synthetic_vis(str(data_path), name="synthetic_vis", num_videos=(1, 2), frames=(4, 5), size=(48, 64),
                       num_categories=3, seed=2)
    out_path = tmp_path / "inspect_results.out.ipynb"
    start = time.perf_counter()
    papermill.execute_notebook(
        str(NOTEBOOK), str(out_path),
        parameters=dict(config_file="configs/synthetic/devis_tiny.yaml", weights="", data_path=str(data_path),
                        dataset="synthetic_vis_val", results_file="", max_videos=1, out_dir=str(tmp_path / "out"),
                        device="cpu"),
        kernel_name="python3", cwd=str(tmp_path), progress_bar=False,
    )
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"the notebook took {elapsed:.1f} s on CPU (budget 60 s)"
    nb = nbformat.read(out_path, as_version=4)
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.output_type == "error"]
    views = [out for out in outputs if out.output_type == "display_data" and WIDGET_VIEW in out.data]
    assert len(views) == 2                                    # results browser + attention explorer
    assert len([out for out in outputs if out.output_type == "display_data" and "image/gif" in out.data]) == 1
    assert len([out for out in outputs if out.output_type == "display_data" and "image/png" in out.data]) == 1
    results = json.loads((tmp_path / "out" / "eval_results" / "results.json").read_text())
    assert results and {e["video_id"] for e in results} == {1}
    viz = tmp_path / "out" / "viz" / "video_1"
    assert (viz / "video.gif").is_file() and len(list((viz / "merged").iterdir())) == len(results[0]["segmentations"])
