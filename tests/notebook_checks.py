"""Shared check of a stored notebook (imported by the notebook tests)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable


def assert_stored_clean(path: str | Path, parameters: Iterable[str]):
    """The notebook at ``path`` validates, has no outputs or execution counts, and its first code cell is
    tagged ``parameters`` and assigns every name in ``parameters``. Returns that cell (for further checks)."""
    import nbformat                   # here: the benchmark module's GPU test runs where nbformat may be absent

    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), f"{path}: stored with outputs"
    assert "parameters" in code[0].metadata.get("tags", []), f"{path}: first code cell is not tagged 'parameters'"
    for name in parameters:
        assert f"\n{name} = " in "\n" + code[0].source, f"{path}: parameter {name} missing"
    return code[0]
