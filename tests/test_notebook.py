"""The Colab notebook: saved without outputs, runs top to bottom on the CPU unmodified, and installs in Colab's layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
# What a normal run must not show (issue: quiet output).
NOISE = ["Loading weights", "IProgress", "FutureWarning", "DeprecationWarning", "`kernels`", "Traceback"]


def _cells() -> list[dict]:
    return json.loads(NOTEBOOK.read_text())["cells"]


def test_the_notebook_is_saved_without_outputs():
    code = [c for c in _cells() if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)


def test_the_install_cell_works_in_colabs_layout(tmp_path):
    """Clone at CONTENT/qdpo, working directory CONTENT: the clone's folder must not shadow the package.

    The cell may neither clone nor pip-install here (qdpo's dependencies are present): it only has to find
    the real package, which the folder named qdpo in the working directory hides.
    """
    content = tmp_path / "content"
    content.mkdir()
    (content / "qdpo").symlink_to(ROOT)
    install = "".join(next(c for c in _cells() if c["cell_type"] == "code")["source"])
    script = (
        "import subprocess, sys\n"
        "sys.path.insert(0, '')  # a notebook kernel's path starts with its working directory\n"
        "def refuse(*args, **kwargs):\n"
        "    raise SystemExit(f'the install cell tried to run {args[0]}')\n"
        "subprocess.run = refuse\n" + install + "\nimport qdpo\nprint('qdpo from', qdpo.__file__)\n"
    )
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script], cwd=content, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"qdpo from {content / 'qdpo' / 'qdpo' / '__init__.py'}" in done.stdout


def test_the_notebook_runs_top_to_bottom_on_the_cpu(tmp_path):
    """Unmodified, without a GPU: picks smoke, trains, plots, compares answers, merges and exports."""
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", "") + json.dumps(output.get("data", {}).get("text/plain", "")))
    shown = "\n".join(texts)
    assert "preset: smoke" in shown and "total (peak of one step)" in shown  # the plan table, before loading
    for noise in NOISE:
        assert noise not in shown, noise
    run = tmp_path / "runs" / "notebook-smoke"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["verdict"] in shown
    assert (run / "report.html").is_file() and (run / "model.gguf").stat().st_size > 100e6
    assert (run / "merged" / "config.json").is_file() and (run / "adapter.zip").is_file()
    generations = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    assert {g["step"] for g in generations} == {0, 4}
    images = sum("image/png" in o.get("data", {}) for c in notebook.cells for o in c.get("outputs", []))
    assert images >= 5 + 2  # the report's five curves, and the live loss and accuracy plots
