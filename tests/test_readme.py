"""README's quickstart is what CI runs: exactly two command lines, the second verbatim in .ci/run; README's
comparison table is the committed run's."""

from __future__ import annotations

import json
import re
from pathlib import Path

from minipeft.compare import format_table

ROOT = Path(__file__).resolve().parents[1]


def quickstart_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart\s+```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no ```bash block under '## Quickstart'"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quickstart_has_exactly_two_command_lines():
    assert len(quickstart_lines()) == 2


def test_ci_runs_the_readme_test_line_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    test_line = quickstart_lines()[1]
    assert "pytest" in test_line
    assert test_line in ci
    assert ci[-1] == test_line  # ... and it is the last thing CI does, so its exit code is CI's


def test_ci_fails_on_any_error():
    assert "set -euo pipefail" in (ROOT / ".ci" / "run").read_text()


def test_the_comparison_table_is_the_committed_runs():
    """The table under "The comparison, measured" is `format_table` of benchmarks/compare/results.json, which
    chapter 9 reads: the README cannot show other numbers than the chapter's verdicts rest on."""
    rows = json.loads((ROOT / "benchmarks" / "compare" / "results.json").read_text())["rows"]
    section = (ROOT / "README.md").read_text().split("## The comparison, measured", 1)[1]
    assert format_table(rows) in section
