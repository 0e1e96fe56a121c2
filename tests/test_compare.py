"""`minipeft compare`: the whole job end to end in quick mode, the table's schema, closed-form counts, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from minipeft import kernels
from minipeft.compare import BASELINES, COLUMNS
from minipeft.data import load_task
from minipeft.methods import METHODS
from minipeft.model import GPT
from minipeft.pretrain import PRESETS
from minipeft.tokenizer import ByteTokenizer

C, L, R, N = 160, 4, 8, 10  # the default base: width, layers; LoRA rank; virtual tokens


def closed_form_trainable(base_params: int) -> dict[str, int]:
    """Trainable parameters of every method, from the formulas in each tuner's docstring."""
    lora = L * R * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))  # r·(in+out) on every Linear of a block
    m = C // 16  # bottleneck width at reduction factor 16
    adapter = 2 * C * m + m + C  # down (C·m + m) and up (m·C + C)
    H = 128  # P-tuning MLP encoder width
    ptuning = 2 * N * C + (C * H + H) + (H * H + H) + (H * C + C)  # 20 seed embeddings + 3-layer MLP
    return {"full": base_params, "lora": lora, "qlora": lora, "lora8": lora, "pfeiffer": L * adapter,
            "houlsby": 2 * L * adapter,
            "prefix": L * 2 * N * C, "prompt": 2 * N * C, "ptuning": ptuning}  # soft prompts use 20 tokens


def test_every_builder_gives_the_closed_form_trainable_count():
    """The registry alone, on an untrained default-shaped GPT (counts do not depend on the weights)."""
    tok, task = ByteTokenizer(), load_task("facts")
    with kernels.use_backend("reference"):
        for key, method in METHODS.items():
            torch.manual_seed(0)
            base = GPT(PRESETS["default"][0])
            expected = closed_form_trainable(base.num_parameters())[key]
            model = method.build(base, task, tok)
            assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected, key


@pytest.fixture(scope="module")
def quick_run(pretrained_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([sys.executable, "-m", "minipeft.cli", "compare", "--quick", "--steps", "150",
                           "--device", "cpu", "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout, json.loads((out / "results.json").read_text()), out


def test_table_has_every_row_and_column(quick_run):
    stdout, _, _ = quick_run
    for header in ("method", "trainable", "% base", "file", "train tok/s", "train MiB", "ms/tok", "ms/tok merged",
                   "metric"):
        assert header in stdout
    for key in [*BASELINES, *METHODS]:
        assert f"\n{key} " in stdout


def test_json_csv_and_plot_are_written(quick_run):
    _, results, out = quick_run
    assert set(results["meta"]) >= {"task", "steps", "seed", "device", "date", "torch", "base_parameters",
                                    "kernel_backend"}
    assert [r["method"] for r in results["rows"]] == [*BASELINES, *METHODS]
    for row in results["rows"]:
        assert set(COLUMNS) <= set(row)
    assert (out / "results.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trainable_counts_equal_the_closed_forms(quick_run):
    _, results, _ = quick_run
    expected = closed_form_trainable(results["meta"]["base_parameters"])
    got = {r["method"]: r["trainable"] for r in results["rows"] if r["method"] in METHODS}
    assert got == expected


def test_measurements_are_real(quick_run):
    _, results, _ = quick_run
    rows = {r["method"]: r for r in results["rows"]}
    for key in METHODS:
        assert rows[key]["train_tokens_per_s"] > 0 and rows[key]["ms_per_token"] > 0
        assert 0 < rows[key]["file_bytes"] <= rows[key]["full_checkpoint_bytes"] * 1.01
    assert rows["lora"]["ms_per_token_merged"] > 0
    assert rows["lora"]["file_bytes"] < rows["full"]["file_bytes"] / 10


# The soft-prompt methods are left out: at compare's 150 steps they are near chance, and on which side of it
# depends on the base's last bits, which depend on the CPU's float kernels (2026-12-04, one machine with AVX-512:
# prompt 0.073, P-tuning 0.000, chance 0.135; README's table of an earlier machine: 0.521 and 0.333), and on the
# training seed (the committed run: prompt 0.07 / 0.22 / 0.32 over seeds 0-2).
# tests/test_prompt.py checks that they learn the task, with the steps they need.
SOFT_PROMPTS = ("prompt", "ptuning")


def test_every_method_beats_chance(quick_run):
    _, results, _ = quick_run
    for row in results["rows"]:
        if row["method"] in METHODS and row["method"] not in SOFT_PROMPTS:
            assert row["metric"] > row["chance"], row


def test_train_seeds_train_each_method_again_and_keep_every_run(tiny_base, tmp_path):
    """--train-seeds 2: each method trained with training seeds 0 and 1 on the same base and data, its metric the
    mean of the runs; the baselines, which train nothing, once."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([sys.executable, "-m", "minipeft.cli", "compare", "--quick", "--preset", "tiny", "--steps",
                           "4", "--methods", "lora", "--train-seeds", "2", "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta"]["train_seeds"] == [0, 1]
    assert results["meta"]["kernel_backend"] == os.environ.get(kernels.ENV_VAR, "auto")
    rows = {r["method"]: r for r in results["rows"]}
    lora = rows["lora"]
    assert lora["train_seeds"] == [0, 1] and len(lora["metric_runs"]) == 2
    assert lora["metric"] == sum(lora["metric_runs"]) / 2 and lora["metric_half_width"] is not None
    assert lora["final_loss_runs"][0] != lora["final_loss_runs"][1]  # another init and other batches
    seed1 = json.loads((tmp_path / "rows" / "lora.seed1.json").read_text())
    assert (lora["metric_runs"][1], lora["final_loss_runs"][1]) == (seed1["metric"], seed1["final_loss"])
    for key in BASELINES:
        assert rows[key]["train_seeds"] == [] and len(rows[key]["metric_runs"]) == 1
        assert rows[key]["metric_half_width"] is None


@pytest.mark.parametrize("argv", [["--methods", "lora,dora"], ["--methods", "lora,prompt,lora"],
                                  ["--task", "translation"], ["--steps", "0"], ["--train-seeds", "0"],
                                  ["--device", "tpu"], ["MINIPEFT_KERNEL=cuda"]])
def test_bad_input_is_one_line_and_exit_2(argv, tmp_path):
    """A bad flag, or a MINIPEFT_KERNEL typo (which the workers would otherwise meet after the base is built)."""
    env = dict(os.environ)
    for arg in [a for a in argv if a.startswith(kernels.ENV_VAR + "=")]:
        argv = [a for a in argv if a != arg]
        env[kernels.ENV_VAR] = arg.split("=", 1)[1]
    proc = subprocess.run([sys.executable, "-m", "minipeft.cli", "compare", "--out", str(tmp_path), *argv],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_unwritable_out_is_one_line_and_exit_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = subprocess.run([sys.executable, "-m", "minipeft.cli", "compare", "--out", str(blocker / "sub")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--out" in proc.stderr
