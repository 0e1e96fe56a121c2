"""`minipeft.finetune.finetune` checks every argument before it loads the base (which may pretrain one for
minutes): a bad one is a ValueError or TypeError naming it, raised while load_base has not run yet."""

from __future__ import annotations

import math

import pytest

import minipeft.finetune as finetune_module
from minipeft.finetune import finetune
from minipeft.pretrain import base_dir


@pytest.fixture
def no_base(monkeypatch):
    """load_base fails loudly: a check that came after it would show up as this error, not as its own."""
    def refuse(*args, **kwargs):
        raise AssertionError("load_base ran before the arguments were checked")

    monkeypatch.setattr(finetune_module, "load_base", refuse)


def test_good_arguments_reach_load_base(no_base):
    """The control: with nothing wrong, the run gets as far as load_base (so the fixture is in its way)."""
    with pytest.raises(AssertionError, match="load_base ran"):
        finetune("lora", preset="tiny", device="cpu", steps=3, progress=False)


@pytest.mark.parametrize("bad,error,message", [
    (dict(method="lorra"), ValueError, r"unknown method 'lorra'; available: .*lora"),
    (dict(task_name="sentimental"), ValueError, r"unknown task 'sentimental'; available: sentiment"),
    (dict(preset="huge"), ValueError, r"unknown base preset 'huge'; available: .*tiny"),
    (dict(steps=0), ValueError, r"steps .*> 0, got 0"),
    (dict(steps="10"), TypeError, r"steps must be an int, got str '10'"),
    (dict(lr=math.nan), ValueError, r"lr must be finite, got nan"),
    (dict(lr=-1e-3), ValueError, r"lr must be > 0, got -0.001"),
    (dict(batch_size=0), ValueError, r"batch_size must be > 0, got .*0"),
    (dict(seed=-1), ValueError, r"seed must be an int in \[0, 2\*\*63\), got -1"),
    (dict(compile="yes"), TypeError, r"compile must be True, False or None, got 'yes'"),
    (dict(fsdp="no"), TypeError, r"fsdp must be True or False, got str 'no'"),
    (dict(progress=1), TypeError, r"progress must be True or False, got int 1"),
    (dict(device="gpu"), ValueError, r"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu'"),
    (dict(device=0), TypeError, r"device must be .*got int 0"),
    (dict(device="cuda:99"), ValueError, r"device 'cuda:99'"),
])
def test_a_bad_argument_is_refused_before_the_base_is_loaded(no_base, bad, error, message):
    args = {"method": "lora", "preset": "tiny", "device": "cpu", "steps": 3, "progress": False, **bad}
    with pytest.raises(error, match=message):
        finetune(**args)


def test_out_may_not_be_a_file_nor_the_cached_base(no_base, tmp_path, monkeypatch):
    """A full fine-tune into the cached base's directory would replace the base every later run loads."""
    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path / "cache"))
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    with pytest.raises(ValueError, match=r"out .*a-file.* exists and is not a directory"):
        finetune("full", preset="tiny", device="cpu", out=a_file, progress=False)
    cached = base_dir("tiny", 3)
    cached.mkdir(parents=True)
    with pytest.raises(ValueError, match=r"out .* is the cached base model's directory"):
        finetune("full", preset="tiny", seed=3, device="cpu", out=cached / ".." / cached.name, progress=False)
    assert list(cached.iterdir()) == [] and a_file.read_text() == "mine"
