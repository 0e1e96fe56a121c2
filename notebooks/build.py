"""Build the course notebooks: each chapter's source (`src/NN_name.py`, jupytext percent format) becomes
`NN_name.ipynb`, executed top to bottom so that the committed notebook shows its plots and numbers.

    python notebooks/build.py            # every chapter
    python notebooks/build.py 03 07      # some chapters

Sources are plain Python files, so they diff and review like code; the .ipynb files are what a learner
opens. tests/test_notebooks.py executes the .ipynb files again in CI.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


# Small models on a 2-core machine: one OpenMP thread per kernel avoids spin-waiting threads (measured up to
# 50x slower generation with two threads on a loaded machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def build(src: Path, timeout: int = 600) -> Path:
    nb = jupytext.read(src)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata.pop("jupytext", None)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    out = HERE / (src.stem + ".ipynb")
    nbformat.write(nb, out)
    print(f"{out.name}: executed in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def main(argv: list[str]) -> None:
    sources = sorted((HERE / "src").glob("[0-9][0-9]_*.py"))
    if argv:
        sources = [s for s in sources if s.name[:2] in argv]
    for src in sources:
        build(src)


if __name__ == "__main__":
    main(sys.argv[1:])
