"""Runs notebooks/benchmark_attention.ipynb under papermill with tiny parameters (on a CPU-only
machine it times the PyTorch reference on tiny shapes) and checks what it wrote."""
import json
from pathlib import Path

import papermill as pm

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "benchmark_attention.ipynb"


def test_notebook_runs_with_tiny_parameters(tmp_path):
    out_json = tmp_path / "bench.json"
    executed = tmp_path / "executed.ipynb"
    pm.execute_notebook(str(NOTEBOOK), str(executed), kernel_name="python3", cwd=str(tmp_path),
                        parameters=dict(cases="tiny", dtypes="float32", budget_ms=20.0,
                                        out_json=str(out_json)), progress_bar=False)
    results = json.loads(out_json.read_text())
    names = {r["case"] for r in results["rows"]}
    assert names == {"tiny encoder", "tiny decoder"}
    assert {r["pass_"] for r in results["rows"]} == {"forward", "forward+backward"}
    assert all(r["reference ms"] > 0 for r in results["rows"])
    nb = json.loads(executed.read_text())
    text = "".join(o.get("text", "") if isinstance(o.get("text"), str) else "".join(o.get("text", []))
                   for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []))
    assert ("no GPU" in text) or ("GPU:" in text)
    # the figure was drawn
    assert any("image/png" in o.get("data", {}) for c in nb["cells"] if c["cell_type"] == "code"
               for o in c.get("outputs", []))
