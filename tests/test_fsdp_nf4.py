"""FSDP2 with a 4-bit base (QLoRA) on CPU (gloo, 2 ranks): the NF4 state is sharded as whole quantization blocks.

Under `minipeft finetune --fsdp` the adapter after a few QLoRA steps matches a 1-process run with the same
global batch; each rank holds about half of the model's 4-bit bytes; under a bf16 MixedPrecisionPolicy the
fp32 NF4 statistics reach forward as fp32, bit for bit. The layout itself, and that its state_dict loads both
ways, is checked in one process (tests/test_nf4_linear.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp_nf4_worker import BATCH, STEPS
from safetensors.torch import load_file
from tolerances import tol

from minipeft import kernels
from minipeft.finetune import finetune

WORKER = Path(__file__).with_name("fsdp_nf4_worker.py")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_base):
    out = tmp_path_factory.mktemp("fsdp_nf4")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(out)]  # fmt: skip
    # the reference kernels: TRITON_INTERPRET (set by conftest on CPU) would make "auto" pick the interpreter
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIPEFT_KERNEL": "reference"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    adapters = [load_file(out / f"rank{r}.safetensors") for r in (0, 1)]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return adapters, reports


def test_qlora_adapters_under_fsdp_match_one_process(two_ranks):
    (rank0, rank1), _ = two_ranks
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"
    with kernels.use_backend("reference"):
        alone = finetune("qlora", "sentiment", steps=STEPS, preset="tiny", device="cpu", batch_size=BATCH,
                         progress=False)["trainable"]  # fmt: skip
    assert alone.keys() == rank0.keys()
    for name in alone:  # same steps on the same global batches; only the order of float sums differs
        torch.testing.assert_close(rank0[name], alone[name], **tol("ranks"), msg=name)
    assert all(alone[name].abs().sum() > 0 for name in alone if "lora_B" in name)  # B starts at 0: it trained


@pytest.mark.parametrize("double_quant", [True, False])
def test_each_rank_holds_half_of_the_4_bit_weights_in_whole_blocks(two_ranks, double_quant):
    _, reports = two_ranks
    rank0, rank1 = (r[str(double_quant)] for r in reports)
    assert rank0["whole_bytes"] == rank1["whole_bytes"]
    for report in (rank0, rank1):
        assert 0.45 < report["rank_bytes"] / report["whole_bytes"] < 0.55, report["rank_bytes"]
        # a shard is rows of (blocksize / 2) bytes: whole blocks of 64 weights (quantize_model's default)
        assert all(cols == 32 for _rows, cols in report["codes_rows"].values())
    # the two halves are the whole (the 0-dim offset, 4 bytes a layer, is the only state both ranks keep)
    n_layers = len(rank0["codes_rows"])
    replicated = 4 * n_layers if double_quant else 0
    assert rank0["rank_bytes"] + rank1["rank_bytes"] == rank0["whole_bytes"] + replicated
    for layer, (rows0, _) in rank0["codes_rows"].items():
        rows1 = rank1["codes_rows"][layer][0]
        assert rows0 - rows1 in (0, 1), layer  # dim 0 split as evenly as FSDP2 can


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_statistics_stay_fp32_under_a_bf16_mixed_precision_policy(two_ranks, double_quant):
    _, reports = two_ranks
    for report in (r[str(double_quant)] for r in reports):
        assert report["seen"] and len(report["seen"]) == len(report["codes_rows"])  # every layer ran
        for layer, seen in report["seen"].items():
            assert seen["lora_dtype"] == "torch.bfloat16", layer  # the policy was on for this block
            assert seen["statistics_dtypes"] == ["torch.float32"], layer
            assert seen["state_bits_equal"] and seen["weight_equal"], layer  # gathered exactly, not rounded
        assert report["grads_finite"] and report["loss"] == report["loss"]  # not NaN
