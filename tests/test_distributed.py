"""Scale-out on CPU (gloo): `minipeft finetune` under torchrun with DDP and with FSDP2.

2 ranks end with identical adapter weights, match a 1-process run with the same global batch, and the
checkpoint rank 0 writes loads into a 1-process model.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tolerances import tol

from minipeft import kernels
from minipeft.data import load_task
from minipeft.finetune import finetune
from minipeft.methods import METHODS
from minipeft.pretrain import load_base
from minipeft.tokenizer import ByteTokenizer
from minipeft.tuners import PeftModel

WORKER = Path(__file__).with_name("distributed_worker.py")


def torchrun(method: str, layout: str, out: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           method, layout, str(out)]
    # the reference kernels: TRITON_INTERPRET (set by conftest on CPU) would make "auto" pick the interpreter
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIPEFT_KERNEL": "reference"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def initial_adapter(method: str) -> dict[str, torch.Tensor]:
    """The trainable tensors as finetune(method, "sentiment", seed=0) builds them, before its first step: the same
    calls in the same order after the seed (loading the base builds a GPT first, which draws from the generator)."""
    torch.manual_seed(0)
    task = load_task("sentiment", seed=0)
    base = load_base("default", 0, device="cpu", train_if_missing=False)
    model = METHODS[method].build(base, task, ByteTokenizer())
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def single_process(pretrained_base):
    """1-process runs with the same global batch (16) and steps, for the equivalence checks."""
    cache = {}

    def run(method: str) -> dict[str, torch.Tensor]:
        if method not in cache:
            with kernels.use_backend("reference"):
                cache[method] = finetune(method, "sentiment", steps=12, preset="default", device="cpu",
                                         batch_size=16, progress=False)["trainable"]
        return cache[method]

    return run


@pytest.mark.parametrize("method,layout", [("lora", "ddp"), ("prompt", "ddp"), ("pfeiffer", "ddp"),
                                           ("lora", "fsdp"), ("prefix", "fsdp")])
def test_two_ranks_agree_match_one_process_and_load_back(method, layout, tmp_path, single_process,
                                                         pretrained_base):
    torchrun(method, layout, tmp_path)
    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"
    alone = single_process(method)
    assert alone.keys() == rank0.keys()
    for name in alone:  # same steps on the same global batches; only the order of float sums differs
        torch.testing.assert_close(rank0[name], alone[name], **tol("ranks"), msg=name)
    # ... and they trained: "alike" would also hold if neither had. Every tensor moved from where finetune() starts
    # it (its seed, then the method's build: LoRA B and the bottleneck's up-projection at zero) by more than the
    # tolerance the runs were compared at.
    initial = initial_adapter(method)
    assert initial.keys() == rank0.keys()
    for name in initial:
        moved = (rank0[name] - initial[name]).abs().max().item()
        assert moved > 10 * tol("ranks")["atol"], f"{name} moved by {moved:.2g} from its initial value"
    # the adapter rank 0 wrote loads into a plain 1-process model and carries the trained weights
    pm = PeftModel.from_pretrained(copy.deepcopy(pretrained_base), tmp_path / "adapter")
    loaded = {n: p for n, p in pm.named_parameters() if n in rank0}
    assert loaded.keys() == rank0.keys()
    for name, p in loaded.items():
        assert torch.equal(p.detach(), rank0[name]), name
