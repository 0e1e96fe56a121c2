"""The command line: a real pretrain + generate on the tiny preset, and one-line errors with exit code 2."""

from __future__ import annotations

import os
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


def test_finetune_into_an_existing_file_fails_before_training(tmp_path):
    blocker = tmp_path / "adapter.safetensors"
    blocker.write_text("not a directory")
    cache = tmp_path / "empty-cache"  # no cached base: reaching the training would pretrain one here first
    env = {**os.environ, "MINIPEFT_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "minipeft.cli", "finetune", "--method", "lora", "--preset", "tiny",
                           "--device", "cpu", "--out", str(blocker)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert str(blocker) in proc.stderr and "not a directory" in proc.stderr
    assert not cache.exists()  # nothing was pretrained, let alone fine-tuned
