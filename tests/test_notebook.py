"""notebooks/analysis.ipynb runs top to bottom on a real experiment and evaluation, and without an evaluation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient


NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analysis.ipynb"
pytestmark = pytest.mark.slow


def run_notebook(tmp_path: Path) -> nbformat.NotebookNode:
    """Execute the notebook in ``tmp_path`` with a kernel on this interpreter (the venv's)."""
    # A "python3" kernelspec of our own: a user-level one elsewhere on the machine could otherwise
    # start another Python without rsilora.
    spec = tmp_path / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    km = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, km=km, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    return nb


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    assert all(not c.outputs and c.execution_count is None for c in nb.cells if c.cell_type == "code")
    assert 'os.environ.get("RSILORA_EXPERIMENT", "runs/tune/stage1")' in nb.cells[1].source


def test_notebook_runs_with_experiment_and_evaluation(tiny_experiment, tiny_eval_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RSILORA_EXPERIMENT", str(tiny_experiment))
    monkeypatch.setenv("RSILORA_EVAL", str(tiny_eval_dir))
    outs = outputs(run_notebook(tmp_path))
    assert not [o for o in outs if o.output_type == "error"]
    images = [o for o in outs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # loss curves, metrics, efficiency, samples
    assert "skipped" not in "".join(o.get("text", "") for o in outs)


def test_notebook_skips_the_evaluation_when_there_is_none(tiny_experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("RSILORA_EXPERIMENT", str(tiny_experiment))
    monkeypatch.setenv("RSILORA_EVAL", str(tmp_path / "no-eval"))
    outs = outputs(run_notebook(tmp_path))
    assert not [o for o in outs if o.output_type == "error"]
    assert len([o for o in outs if "image/png" in o.get("data", {})]) == 1  # the loss curves
    assert "no evaluation: skipped" in "".join(o.get("text", "") for o in outs)
