"""The course: eleven chapters exist, each is built from its source, each runs top to bottom on the CPU, and each
states its claims through notebooks/course.py, all of which held when the notebook was executed here."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CHAPTERS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
CLAIMS_LINE = re.compile(r"(\d+) claims checked in this chapter, all held\.")
MIN_CLAIMS = 3


def test_there_are_eleven_chapters_each_with_its_source():
    assert [p.name[:2] for p in CHAPTERS] == [f"{i:02d}" for i in range(1, 12)]
    for nb in CHAPTERS:
        assert (NOTEBOOKS / "src" / (nb.stem + ".py")).is_file(), f"{nb.name} has no source in notebooks/src"
        assert (NOTEBOOKS / "solutions" / (nb.stem + ".py")).is_file(), \
            f"{nb.name}'s exercises have no worked solutions in notebooks/solutions"


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
    client.execute()  # raises CellExecutionError on the first failing cell (a claim that fails raises)
    text = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []) if out.get("output_type") == "stream")
    reports = CLAIMS_LINE.findall(text)
    assert reports, f"{path.name} does not end with course.claims_report()"
    assert int(reports[-1]) >= MIN_CLAIMS, f"{path.name} checks {reports[-1]} claims, fewer than {MIN_CLAIMS}"
    headings = [line.strip() for cell in nb.cells if cell.cell_type == "markdown" for line in cell.source.splitlines()]
    assert "## Summary" in headings and "## Exercises" in headings, f"{path.name} lacks a Summary or Exercises heading"


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
