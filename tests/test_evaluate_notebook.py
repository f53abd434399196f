"""notebooks/evaluate.ipynb: stored clean with its parameters; a papermill run on a tiny checkpoint shows the
metrics table and the per-category AP chart. Also devis_core/evaluation_plots.py, which draws that chart."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import papermill
import pytest

from devis_core.evaluation_plots import metrics_table, metrics_table_html, per_category_ap, plot_per_category_ap
from notebook_checks import assert_stored_clean
from test_inference import CONFIG, TINY, make_tiny_data, save_tiny_weights, tiny_cfg

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "evaluate.ipynb"
PARAMETERS = ("config_file", "overrides", "weights", "dataset", "output_dir", "data_path", "max_videos")


def _metrics(per_category):
    stats = dict(AP=0.25, AP50=0.5, AP75=0.125, APs=-1.0, APm=0.3, APl=0.0, AR1=0.2, AR10=0.4, AR100=0.4,
                 ARs=-1.0, ARm=0.1, ARl=0.0)
    return {**stats, "per_category": per_category}


CATS = [{"category_id": 1, "name": "disc", "AP": 0.1, "AR100": 0.2},
        {"category_id": 2, "name": "square", "AP": -1.0, "AR100": -1.0},
        {"category_id": 3, "name": "triangle", "AP": 0.4, "AR100": 0.5}]


def test_per_category_rows_sorted_and_without_ground_truth_last():
    assert per_category_ap(_metrics(CATS)) == [("triangle", 3, 40.0), ("disc", 1, 10.0), ("square", 2, None)]
    assert per_category_ap(_metrics(CATS), sort=False) == [("disc", 1, 10.0), ("square", 2, None),
                                                           ("triangle", 3, 40.0)]
    with pytest.raises(KeyError, match=r"per_category\[0\] lacks 'AP'"):
        per_category_ap(_metrics([{"category_id": 1, "name": "disc"}]))


def test_per_category_chart_bars_match_the_metrics():
    fig = plot_per_category_ap(_metrics(CATS))
    ax = fig.axes[0]
    bars = ax.patches
    assert [round(b.get_width(), 6) for b in bars] == [40.0, 10.0, 0.0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["triangle (3)", "disc (1)", "square (2)"]
    assert "n/a" in [t.get_text() for t in ax.texts]
    # The dashed mean-AP line sits at AP x 100.
    assert list(ax.lines[0].get_xdata()) == [25.0, 25.0]


def test_metrics_table_rows():
    rows = dict(metrics_table(_metrics(CATS)))
    assert rows["AP"] == "25.0" and rows["AP75"] == "12.5" and rows["APs"] == "n/a" and len(rows) == 12
    assert "<th>AP50</th>" in metrics_table_html(_metrics(CATS)) and "<td>50.0</td>" in metrics_table_html(
        _metrics(CATS))


def test_notebook_is_stored_clean_with_its_parameters():
    assert_stored_clean(NOTEBOOK, PARAMETERS)


@pytest.mark.timeout(120)
def test_notebook_runs_inference_and_shows_metrics_and_chart(tmp_path, monkeypatch):
    data_path = make_tiny_data(tmp_path)
    weights = tmp_path / "tiny_devis.pth"
    save_tiny_weights(tiny_cfg(data_path), weights)
    # The kernel inherits this: one thread is as fast for the tiny model and robust on a loaded machine.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out_nb = tmp_path / "evaluate.out.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK), str(out_nb), kernel_name="python3", cwd=str(tmp_path), progress_bar=False,
        parameters=dict(config_file=CONFIG, overrides=TINY, weights=str(weights), dataset="synthetic_vis_val",
                        output_dir=str(tmp_path / "run"), data_path=data_path, max_videos=2))
    nb = nbformat.read(out_nb, as_version=4)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in text
    assert "videos: 2 " in text and "frames/s" in text
    html = [o for o in outputs if o.output_type == "display_data" and "text/html" in o.data]
    assert len(html) == 1 and "<th>AR100</th>" in html[0].data["text/html"]
    pngs = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(pngs) == 1
    metrics = json.loads((tmp_path / "run" / "eval_results" / "metrics.json").read_text())
    assert metrics["num_videos"] == 2 and len(metrics["per_category"]) == 3
