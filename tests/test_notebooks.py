"""Execute the notebooks through papermill with tiny parameters and check what they display."""

import json
from pathlib import Path

import nbformat
import papermill
import pytest
from notebook_checks import assert_stored_clean

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _outputs(nb):
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def test_quickstart_is_stored_clean():
    params = assert_stored_clean(NOTEBOOKS / "00_quickstart.ipynb",
                                 ("data_path", "dataset_name", "num_videos_train", "num_videos_valid", "frames_min",
                                  "frames_max", "height", "width", "num_categories", "seed", "grid_videos",
                                  "grid_frames"))
    assert 'data_path = "data"' in params.source and 'dataset_name = "synthetic_vis"' in params.source


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quickstart_runs(tmp_path):
    data_path = tmp_path / "data"
    out_path = tmp_path / "00_quickstart.out.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOKS / "00_quickstart.ipynb"), str(out_path),
        parameters=dict(data_path=str(data_path), dataset_name="tiny_vis", num_videos_train=2,
                        num_videos_valid=1, frames_min=3, frames_max=4, height=48, width=64,
                        num_categories=3, seed=1, grid_videos=2, grid_frames=3),
        kernel_name="python3", cwd=str(tmp_path), progress_bar=False,
    )
    nb = nbformat.read(out_path, as_version=4)
    outputs = _outputs(nb)
    assert not [out for out in outputs if out.output_type == "error"]
    assert all(cell.execution_count is not None for cell in nb.cells if cell.cell_type == "code")
    pngs = [out for out in outputs if out.output_type == "display_data" and "image/png" in out.data]
    assert len(pngs) == 1
    views = [out for out in outputs if out.output_type == "display_data" and WIDGET_VIEW in out.data]
    assert len(views) == 1 and views[0].data[WIDGET_VIEW]["model_id"]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    # The summary reports the requested sizes: 2 train videos, 1 valid video, 3 categories listed.
    assert "[train]" in text and "videos: 2 " in text and "[valid]" in text and "videos: 1 " in text
    assert (data_path / "tiny_vis" / "train" / "instances.json").is_file()
    ann = json.loads((data_path / "tiny_vis" / "train" / "instances.json").read_text())
    assert len(ann["videos"]) == 2
