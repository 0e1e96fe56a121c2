"""The course: ten chapters exist, each is built from its source, and each runs top to bottom on the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CHAPTERS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def test_there_are_ten_chapters_each_with_its_source():
    assert [p.name[:2] for p in CHAPTERS] == [f"{i:02d}" for i in range(1, 11)]
    for nb in CHAPTERS:
        assert (NOTEBOOKS / "src" / (nb.stem + ".py")).is_file(), f"{nb.name} has no source in notebooks/src"


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_notebook_runs_top_to_bottom(path, pretrained_base, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # the kernel inherits the session's model cache (pretrained_base has filled it) and a headless backend
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # small models on 2 cores: one thread avoids spin-waiting
    assert os.environ.get("MINIPEFT_CACHE")
    nb = nbformat.read(path, as_version=4)
    assert any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), \
        f"{path.name} is committed without outputs: run `python notebooks/build.py {path.name[:2]}`"
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError on the first failing cell


SOLUTIONS = sorted((NOTEBOOKS / "solutions").glob("[0-9][0-9]_*.py"))


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_worked_solutions_pass_their_chapters_checks(path):
    """Each chapter's worked solutions, run as a script, pass the checks the chapter gives the learner."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300,
                            cwd=NOTEBOOKS, env={**os.environ, "MPLBACKEND": "Agg"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "not done yet" not in result.stdout and "correct" in result.stdout, result.stdout[-2000:]
