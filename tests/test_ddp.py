"""DistributedDataParallel through the one training loop: 2 CPU processes (gloo) end with identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file


def test_two_process_ddp_training_keeps_ranks_identical_and_lowers_loss(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert w0.keys() == w1.keys()
    for k in w0:
        assert w0[k].equal(w1[k]), f"ranks disagree on {k}"
    for rank in (0, 1):
        losses = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses
    # the two ranks saw different batches (different data per rank), so their losses differ
    assert json.loads((tmp_path / "rank0.json").read_text()) != json.loads((tmp_path / "rank1.json").read_text())


def test_a_loss_that_diverges_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    """Rank 1's loss turns NaN at step 3: both ranks raise TrainingDivergedError at step 3 (the loss check is
    agreed between ranks), and the run ends instead of hanging in the next step's all-reduce."""
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), str(tmp_path), "diverge"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"stopped_at": 3}
