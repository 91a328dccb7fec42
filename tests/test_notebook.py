"""The Colab notebook runs top to bottom on the CPU with the tiny config (nbclient, a real
Jupyter kernel), and what it shows is the run's own results."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "colab_tpu.ipynb"


def _outputs(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_notebook_runs_top_to_bottom_on_cpu(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (parameters,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    parameters.source += f'\nOUTPUT_DIR = "{tmp_path / "run"}"\nDATA_DIR = "{tmp_path / "data"}"\n'
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()

    code = [c for c in notebook.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    printed = "\n".join(_outputs(c) for c in code)
    assert f"project root: {REPO}" in printed
    assert "backend cpu: 1 device(s)" in printed

    results = json.loads((tmp_path / "run" / "results.json").read_text())
    avg = f"AvgAcc {100 * results['avg_acc']:.1f}  FM {100 * results['fm']:.1f}"
    assert avg in printed
    assert len([line for line in printed.splitlines() if line.startswith("base ")]) == 1
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    pngs = sorted((tmp_path / "run").rglob("*.png"))
    assert pngs and len(images) == len(pngs)
