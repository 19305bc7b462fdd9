"""The notebooks in notebooks/ run top to bottom in a fresh kernel of this environment; a failing cell fails."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402
from nbclient.exceptions import CellExecutionError  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "meddinov3-test"


def _kernel_manager(tmp_path: Path) -> KernelManager:
    """A kernel that is exactly this interpreter (not whatever `python` a global kernelspec finds)."""
    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "meddinov3-hf tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], allowed_kernelspecs={KERNEL})
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def run_notebook(path: Path, tmp_path: Path, monkeypatch) -> nbformat.NotebookNode:
    notebook = nbformat.read(path, as_version=4)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks work in tempfile.mkdtemp() folders
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("MEDDINOV3_MODEL", raising=False)
    manager = _kernel_manager(tmp_path)
    assert manager.kernel_spec.argv[0] == sys.executable
    client = nbclient.NotebookClient(
        notebook, km=manager, timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    return notebook


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart", "finetune", "features"])
def test_notebook_runs(name, tmp_path, monkeypatch):
    notebook = run_notebook(NOTEBOOKS / f"{name}.ipynb", tmp_path, monkeypatch)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the pictures were drawn
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    # Quiet by default: no weight loading bars, no "IProgress not found" notice.
    assert "Loading weights" not in stderr and "IProgress" not in stderr


@pytest.mark.parametrize("name", ["quickstart", "finetune", "features"])
def test_notebooks_are_stored_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    assert notebook.cells[0].cell_type == "markdown"
    assert "**Needs:**" in notebook.cells[0].source and "**Takes:**" in notebook.cells[0].source
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: outputs not stripped"


def test_a_failing_cell_fails_the_run(tmp_path, monkeypatch):
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("raise RuntimeError('broken')")]
    )
    path = tmp_path / "broken.ipynb"
    nbformat.write(notebook, path)
    with pytest.raises(CellExecutionError, match="broken"):
        run_notebook(path, tmp_path, monkeypatch)


def test_readme_links_the_notebooks():
    readme = (NOTEBOOKS.parent / "README.md").read_text()
    for name in ("quickstart", "finetune", "features"):
        assert f"](notebooks/{name}.ipynb)" in readme
