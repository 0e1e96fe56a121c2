"""The main job: the PEFT overview's comparison table of fine-tuning methods, measured instead of asserted.

The PEFT overview compares full fine-tuning, prefix tuning / soft prompts and adapters with claims such as "~0.1%
of LLM parameters", "Storage cost: Low", "Training speed: Fast" and "Inference latency: slightly increased";
the other course texts add LoRA, QLoRA (and LoRA on an 8-bit base) and P-tuning. `minipeft compare` fine-tunes each
method on one built-in task with the same step budget and measures, in the same run:

    trainable parameters (count and % of the base) · adapter file size beside the full checkpoint ·
    training throughput (tokens/s) and peak training memory · inference latency per generated token
    (LoRA merged and unmerged) · the task metric on the test split

plus two baselines that train nothing: the base model zero-shot, and a hand-written discrete prompt
("prompt engineering"). Every method runs in a fresh process, because a process's resident memory never
shrinks: peak memory on the CPU is the peak RSS (VmHWM, reset just before) minus the RSS before the method
was built, so it counts the adapter, gradients, optimizer state and activations; on CUDA it is the
allocator's peak over what was allocated before.

The methods and their learning rates (each the best of a small sweep) are the registry in
minipeft/methods.py; how latency and memory are measured (one statistic: the median after a warm-up) is in
minipeft/measure.py.

A score from one fine-tuning run is one draw: the adapter's random init and the order of the batches move it.
`--train-seeds N` trains every method N times, with training seeds seed, seed+1, …, seed+N−1 (the base, the
task's data and the baselines stay those of `--seed`), and keeps each run's metric in `metric_runs`; `metric`
is their mean, and the table prints it ± the half-width of its 95% t-interval (minipeft/stats.py). The other
columns (speed, memory, latency, file size) are the first run's.

The default task is `facts` because it asks what the overview's table is about: adapting a model without
losing what it knows. Its answers come from pretraining (test people never appear in fine-tuning), so a
method that overwrites the base forgets them. `--task sentiment` runs the classification task instead.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from minipeft import kernels
from minipeft.checkpoint import atomic_write, check_output_dir, save_json, save_model
from minipeft.data import TASKS, load_task, task_batch, task_loss
from minipeft.evaluate import evaluate
from minipeft.measure import dir_bytes, generation_ms_per_token, peak_memory_mb, reset_peak_memory
from minipeft.methods import LORA_METHODS, METHODS
from minipeft.pretrain import load_base
from minipeft.stats import fmt_interval, interval
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import TrainConfig, resolve_device, train

BASELINES = ("zero-shot", "discrete-prompt")
COLUMNS = ["method", "trainable", "trainable_pct", "file_bytes", "full_checkpoint_bytes", "train_tokens_per_s",
           "train_peak_mb", "ms_per_token", "ms_per_token_merged", "metric", "metric_half_width", "metric_name",
           "chance"]


# ------------------------------------------------------------------------------------------ one method
@torch.no_grad()
def latency_ms_per_token(model, prompt_ids: list[int], device, new_tokens: int = 32, repeats: int = 5) -> float:
    """Median wall time per generated token for one greedy generation (batch 1, KV cache), after a warm-up."""
    model.eval()
    idx = torch.tensor([prompt_ids], device=device)
    return generation_ms_per_token({"model": model}, idx, new_tokens, repeats)["model"]


def run_method(key: str, args: argparse.Namespace) -> dict:
    """Fine-tune one method (or score one baseline) and measure it; meant to run in a fresh process. The base
    and the task come from `args.seed`, the adapter's init and the batches from `args.train_seed`."""
    device = resolve_device(args.device)
    train_seed = getattr(args, "train_seed", None)
    train_seed = args.seed if train_seed is None else train_seed
    torch.manual_seed(args.seed)
    tok, task = ByteTokenizer(), load_task(args.task, seed=args.seed)
    base = load_base(args.preset, args.seed, device=str(device), train_if_missing=False)
    n_base = base.num_parameters()
    prompt_ids = tok.encode(task.test[0].prompt, add_bos=True)
    max_eval = 100 if args.quick else None
    row = {"method": key, "metric_name": task.metric, "chance": task.chance, "trainable": 0, "trainable_pct": 0.0,
           "file_bytes": 0, "train_tokens_per_s": None, "train_peak_mb": None, "ms_per_token_merged": None}
    new_tokens = 8 if args.quick else 32

    if key in BASELINES:
        prefix = task.discrete_prompt if key == "discrete-prompt" else ""
        row["metric"] = evaluate(base, task, tok, "test", max_examples=max_eval, prefix=prefix)
        row["ms_per_token"] = latency_ms_per_token(base, tok.encode(prefix + task.test[0].prompt, add_bos=True),
                                                   device, new_tokens)
        return row

    method = METHODS[key]
    mem_before = reset_peak_memory(device)
    torch.manual_seed(train_seed)  # the adapter's init depends on the seed alone, not on what loading the base drew
    model = method.build(base, task, tok).to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    T = base.config.block_size
    cfg = TrainConfig(steps=args.steps, lr=method.lr, batch_size=16, warmup_steps=max(1, min(10, args.steps // 10)),
                      seed=train_seed)
    result = train(model, lambda g: task_batch(task, tok, cfg.batch_size, T, g), cfg, loss_fn=task_loss(task, tok),
                   desc=f"{key:>9}")
    peak = peak_memory_mb(device) - mem_before
    row.update(trainable=trainable, trainable_pct=100 * trainable / n_base, train_tokens_per_s=result.tokens_per_second,
               train_peak_mb=peak, final_loss=result.losses[-1])
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        row["metric"] = evaluate(model, task, tok, "test", max_examples=max_eval)
        row["ms_per_token"] = latency_ms_per_token(model, prompt_ids, device, new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, tmp)  # full: the whole GPT; a PeftModel: its one adapter ("default")
        row["file_bytes"] = dir_bytes(tmp)
    if key in LORA_METHODS:
        merged = model.merge_and_unload()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            row["ms_per_token_merged"] = latency_ms_per_token(merged, prompt_ids, device, new_tokens)
    return row


# ------------------------------------------------------------------------------------------ the table
def _fmt_bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _fmt_metric(row: dict) -> str:
    """The metric, ± the half-width of its 95% t-interval over training seeds when there are several."""
    return fmt_interval(row["metric_runs"]) if len(row["metric_runs"]) > 1 else f"{row['metric']:.3f}"


def format_table(rows: list[dict]) -> str:
    header = ["method", "trainable", "% base", "file", "train tok/s", "train MiB", "ms/tok", "ms/tok merged",
              "metric"]
    lines = [[r["method"], f"{r['trainable']:,}", f"{r['trainable_pct']:.3f}%", _fmt_bytes(r["file_bytes"]),
              _fmt(r["train_tokens_per_s"], ",.0f"), _fmt(r["train_peak_mb"], ".0f"), _fmt(r["ms_per_token"], ".2f"),
              _fmt(r["ms_per_token_merged"], ".2f"), _fmt_metric(r)] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def join(cells: list[str]) -> str:  # the method name left-aligned, numbers right-aligned
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([join(header), join(["-" * w for w in widths]), *(join(line) for line in lines)])


def plot(rows: list[dict], path: Path, title: str) -> None:
    """metric against trainable % (log axis), latency bars and storage bars, in one PNG."""
    import matplotlib  # here, not at the top: a heavy import that only drawing needs (never the workers)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5.6))
    trained = [r for r in rows if r["trainable"]]
    ax = axes[0]
    # One marker and colour per method, named in the legend: methods with nearly the same trainable % and
    # metric would overlap as text next to their points.
    markers = "osD^vP*Xh<>p"
    for i, r in enumerate(trained):
        ax.scatter(r["trainable_pct"], r["metric"], s=45, marker=markers[i % len(markers)], color=f"C{i % 10}",
                   label=r["method"], zorder=3)
    styles = iter(["--", "-."])
    for r in rows:
        if not r["trainable"]:  # baselines: a labelled line each, in the legend (never text on the axes)
            ax.axhline(r["metric"], ls=next(styles, ":"), lw=1, color="gray", label=f"{r['method']} (no training)")
    if rows:
        ax.axhline(rows[0]["chance"], ls=":", lw=1, color="red", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the base, log scale)")
    ax.set_ylabel(f"test {rows[0]['metric_name'] if rows else 'metric'}")
    ax.set_title("task metric vs trainable parameters")
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    names = [r["method"] for r in rows]
    ax = axes[1]
    pos = list(range(len(rows)))
    merged = [(i, r["ms_per_token_merged"]) for i, r in enumerate(rows) if r["ms_per_token_merged"]]
    width = 0.4 if merged else 0.8  # side by side where a merged bar exists, never on top of each other
    ax.bar([i - width / 2 if merged else i for i in pos], [r["ms_per_token"] for r in rows], width=width,
           label="as trained")
    if merged:
        ax.bar([i + width / 2 for i, _ in merged], [v for _, v in merged], width=width, label="LoRA merged")
    ax.set_xticks(pos, names, rotation=45, ha="right")
    ax.set_ylabel("inference latency (ms per generated token)")
    ax.set_title("latency per token (batch 1, KV cache)")
    if rows:
        ax.set_ylim(0, 1.3 * max(r["ms_per_token"] for r in rows))  # a free strip on top for the legend
    ax.legend(ncol=2, loc="upper right")
    ax = axes[2]
    stored = [r for r in rows if r["file_bytes"]]
    ax.bar(range(len(stored)), [r["file_bytes"] / 1024 for r in stored])
    ax.set_xticks(range(len(stored)), [r["method"] for r in stored], rotation=45, ha="right")
    ax.set_yscale("log")
    if stored and rows[0].get("full_checkpoint_bytes"):
        full_kib = rows[0]["full_checkpoint_bytes"] / 1024
        ax.axhline(full_kib, ls="--", color="gray", label="full checkpoint")
        ax.set_ylim(top=10 * max(full_kib, *(r["file_bytes"] / 1024 for r in stored)))  # a decade for the legend
        ax.legend(loc="upper right")
    ax.set_ylabel("file size on disk (KiB, log scale)")
    ax.set_title("storage per task")
    fig.suptitle(title)
    fig.tight_layout()

    def write(tmp: str) -> None:
        fig.savefig(tmp, dpi=110, format="png")

    atomic_write(path, write)
    plt.close(fig)


def write_outputs(rows: list[dict], meta: dict, out: Path) -> None:
    save_json({"meta": meta, "rows": rows}, out / "results.json")

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    atomic_write(out / "results.csv", write_csv)
    plot(rows, out / "results.png", f"minipeft compare · task {meta['task']} · {meta['steps']} steps · "
                                    f"{meta['device']} · {meta['date']}")


# ------------------------------------------------------------------------------------------ the command
def parse_methods(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in METHODS]
    if unknown or not keys:
        raise ValueError(f"--methods: unknown method(s) {unknown or [text]}; available: {', '.join(METHODS)}")
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:  # a method run twice on one seed would pass for two seeds in its interval
        raise ValueError(f"--methods: {', '.join(twice)} listed more than once in {text!r}; name each method once "
                         "(--train-seeds N trains each on N seeds)")
    return keys


def compare(args: argparse.Namespace) -> list[dict]:
    """Run the baselines and every method, each in a fresh process; return the table's rows."""
    out = Path(args.out)
    check_output_dir(out, label="--out")
    device = resolve_device(args.device)
    methods = parse_methods(args.methods)
    backend = kernels.get_backend()  # "auto" unless set otherwise; a MINIPEFT_KERNEL typo stops here, not in a worker
    base = load_base(args.preset, args.seed, device="cpu")  # pretrains (and caches) if needed
    with tempfile.TemporaryDirectory() as tmp:
        save_model(base, tmp)
        full_bytes = dir_bytes(tmp)
    train_seeds = list(range(args.seed, args.seed + args.train_seeds))
    runs: dict[str, list[dict]] = {}
    # seed by seed, every method within a seed: a run cut short still has whole seeds
    for i, train_seed in enumerate(train_seeds):
        for key in [*BASELINES, *methods] if i == 0 else methods:  # the baselines train nothing: once
            runs.setdefault(key, []).append(_run_worker(key, train_seed, args, device, out, backend))
    rows = []
    for key, done in runs.items():
        row = dict(done[0])
        row["metric_runs"] = [r["metric"] for r in done]
        row["metric"], half_width = interval(row["metric_runs"])
        row["metric_half_width"] = None if math.isnan(half_width) else half_width
        row["train_seeds"] = train_seeds[:len(done)] if key not in BASELINES else []
        if "final_loss" in row:
            row["final_loss_runs"] = [r["final_loss"] for r in done]
        row["full_checkpoint_bytes"] = full_bytes
        rows.append(row)
    meta = {"task": args.task, "steps": args.steps, "seed": args.seed, "train_seeds": train_seeds,
            "device": _device_name(device), "kernel_backend": backend,
            "preset": args.preset, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "base_parameters": base.num_parameters(), "learning_rates": {k: METHODS[k].lr for k in methods}}
    write_outputs(rows, meta, out)
    return rows


def _run_worker(key: str, train_seed: int, args: argparse.Namespace, device: torch.device, out: Path,
                backend: str) -> dict:
    """One method (or baseline) trained and measured in a fresh process, on kernel backend `backend` (this
    process's, which meta records: a set_backend here reaches the worker only through MINIPEFT_KERNEL); its row."""
    row_file = out / "rows" / f"{key}.seed{train_seed}.json"
    cmd = [sys.executable, "-m", "minipeft.compare", "--worker", key, "--task", args.task, "--steps",
           str(args.steps), "--seed", str(args.seed), "--train-seed", str(train_seed), "--device", str(device.type),
           "--preset", args.preset, "--out", str(out)] + (["--quick"] if args.quick else [])
    env = {**os.environ, kernels.ENV_VAR: backend}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)  # stderr (progress bars) passes through
    if proc.returncode != 0 or not row_file.is_file():
        raise RuntimeError(f"method {key!r} (training seed {train_seed}) failed (exit code {proc.returncode}); see "
                           "the output above")
    return json.loads(row_file.read_text())


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="facts", help=f"one of {', '.join(TASKS)}")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ",".join(METHODS))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps per method (batch 16)")
    p.add_argument("--seed", type=int, default=0, help="the base model's and the task's seed")
    p.add_argument("--train-seeds", type=int, default=1,
                   help="train each method this many times (training seeds seed, seed+1, ...): metric ± interval")
    p.add_argument("--out", default="runs/compare", help="where results.json/.csv/.png go")
    p.add_argument("--preset", default="default", choices=["default", "tiny"], help="base model preset")
    p.add_argument("--quick", action="store_true", help="score on 100 test examples and 8-token latencies (for CI)")


def validate(args: argparse.Namespace) -> None:
    if args.task not in TASKS:
        raise ValueError(f"--task: unknown task {args.task!r}; available: {', '.join(TASKS)}")
    if args.steps <= 0:
        raise ValueError(f"--steps must be a positive integer, got {args.steps}")
    if args.train_seeds <= 0:
        raise ValueError(f"--train-seeds must be a positive integer, got {args.train_seeds}")
    parse_methods(args.methods)
    resolve_device(args.device)


def _worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="minipeft.compare")
    add_arguments(p)
    p.add_argument("--worker", required=True)
    p.add_argument("--train-seed", type=int, required=True)
    args = p.parse_args(argv)
    row = run_method(args.worker, args)
    save_json(row, Path(args.out) / "rows" / f"{args.worker}.seed{args.train_seed}.json")
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
