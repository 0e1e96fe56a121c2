"""The command line: a real pretrain + generate on the tiny preset, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from minipeft.cli import main


def test_pretrain_then_generate_on_the_tiny_preset(tiny_base, capsys):
    # tiny_base has already trained and cached the tiny preset in $MINIPEFT_CACHE
    assert main(["pretrain", "--preset", "tiny"]) == 0
    assert "already cached" in capsys.readouterr().out
    assert main(["generate", "--preset", "tiny", "Zuvel lives in", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("Zuvel lives in")


@pytest.mark.parametrize("argv", [["pretrain", "--steps", "0"], ["pretrain", "--preset", "huge"],
                                  ["generate"], ["frobnicate"]])
def test_bad_arguments_exit_2_with_one_line(argv):
    proc = subprocess.run([sys.executable, "-m", "minipeft.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr.strip().splitlines()[-1]
