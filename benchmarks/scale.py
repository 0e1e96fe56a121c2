"""Scale-out benchmark: LoRA / QLoRA fine-tuning across GPUs with DDP and FSDP2.

Under torchrun, one launch per command:

    torchrun --nproc_per_node 2 benchmarks/scale.py throughput              # GPT-2-medium shape, LoRA, DDP
    torchrun --nproc_per_node 2 benchmarks/scale.py memory --layout ddp     # 7B shape, QLoRA, peak GiB per GPU
    torchrun --nproc_per_node 2 benchmarks/scale.py memory --layout fsdp
    torchrun --nproc_per_node 2 benchmarks/scale.py throughput --shape tiny --device cpu   # smoke test (gloo)

How the speed-up is formed. `throughput` with DDP measures every world size of `--worlds` (default: 1 and the
launch's) in the SAME job: world size w trains on ranks 0 … w−1 over a process subgroup while the other ranks
wait at a barrier, and the world sizes take turns in `--rounds` interleaved rounds (default 2). The speed-up of
w is, per round, its tokens/s over world size 1's of the same round; the table gives the median of those
per-round ratios with their min–max. FSDP2 shards over the whole job (minipeft.finetune.shard_fsdp), so with
`--layout fsdp` only the launch's world size is measured: its rounds and spread are printed, and a speed-up
against another world size is a ratio between two launches — not paired, so it carries whatever moved between
the launches; compare it with both launches' spreads. `memory` measures the launch's world size and layout.

Random weights (no checkpoint is needed to measure speed or memory), bf16 autocast on CUDA, T=512, AdamW on the
adapter. A (world size, round) cell builds its model afresh, runs 3 warm-up steps, then times `--steps` − 3
steps; its tokens/s counts the tokens of all its ranks per second of the median step (minipeft.measure.median_ms:
wall-clock, host included, CUDA synchronised around each step). Peak memory is `torch.cuda.max_memory_allocated`
since a reset after the build, the max over ranks and rounds. Keep NVLink multicast off on shared hosts:
NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 (set below when unset).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import os
import statistics

import torch
import torch.distributed as dist

for _var in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
    os.environ.setdefault(_var, "0" if _var == "NCCL_NVLS_ENABLE" else "1")

from minipeft.finetune import shard_fsdp  # noqa: E402
from minipeft.measure import median_ms, peak_memory_mb, reset_peak_memory  # noqa: E402
from minipeft.model import GPT, GPTConfig  # noqa: E402
from minipeft.quant import quantize_model  # noqa: E402
from minipeft.tuners import LoraConfig, get_peft_model  # noqa: E402

SHAPES = {
    "medium": GPTConfig(block_size=1024, vocab_size=50304, n_layer=24, n_head=16, n_embd=1024),
    "7b": GPTConfig(block_size=1024, vocab_size=32000, n_layer=32, n_head=32, n_embd=4096),
    "tiny": GPTConfig(block_size=128, vocab_size=260, n_layer=2, n_head=2, n_embd=64),
}
WARMUP = 3


def run_cell(args, shape: GPTConfig, device: torch.device, group, world: int) -> dict:
    """Build the model on this rank (one of the `world` ranks of `group`), train; tokens/s and this rank's peak."""
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(shape)
    if args.what == "memory":  # QLoRA: the frozen base in NF4 + double quant
        model = quantize_model(model)
    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    if args.layout == "fsdp":
        shard_fsdp(pm)
        net = pm
    else:
        net = torch.nn.parallel.DistributedDataParallel(pm, device_ids=[device.index] if cuda else None,
                                                        process_group=group)
    opt = torch.optim.AdamW([q for q in pm.parameters() if q.requires_grad], lr=1e-4)
    if cuda:
        reset_peak_memory(device)
    T = min(args.seq, shape.block_size)
    batches = itertools.cycle([torch.randint(0, shape.vocab_size, (args.batch, T), device=device)
                               for _ in range(args.steps)])

    def step() -> None:
        idx = next(batches)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            _, loss = net(idx, targets=idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_ms = median_ms(step, repeats=args.steps - WARMUP, warmup=WARMUP)  # synchronises CUDA around each step
    return {"tokens_per_s": world * args.batch * T / (step_ms / 1000), "step_ms": step_ms,
            "peak_gib": peak_memory_mb(device) / 1024 if cuda else 0.0, "params_m": model.num_parameters() / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["throughput", "memory"])
    p.add_argument("--layout", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--shape", choices=list(SHAPES), default=None, help="default: medium (throughput), 7b (memory)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--batch", type=int, default=8, help="sequences per rank")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help=f"steps per cell: {WARMUP} warm-up, the rest timed")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (≥ 2: the spread needs two)")
    p.add_argument("--worlds", type=int, nargs="+", default=None,
                   help="world sizes to measure in this job (throughput, ddp; default: 1 and the launch's)")
    args = p.parse_args()
    if args.rounds < 2:
        p.error("--rounds must be at least 2: the spread needs two rounds")
    if args.steps <= WARMUP:
        p.error(f"--steps must be more than the {WARMUP} warm-up steps")
    shape = SHAPES[args.shape or ("medium" if args.what == "throughput" else "7b")]
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.what == "throughput" and args.layout == "ddp":
        worlds = sorted(set(args.worlds or [1, world]))
        if worlds[0] < 1 or worlds[-1] > world:
            p.error(f"--worlds must lie in 1 … {world} (this launch's world size), got {args.worlds}")
    else:
        if args.worlds not in (None, [world]):
            p.error(f"--worlds: {args.what} with --layout {args.layout} measures the launch's world size "
                    f"({world}) only; launch torchrun with another --nproc_per_node for another")
        worlds = [world]
    # every rank creates every subgroup, in the same order (torch.distributed's rule); None = the whole job
    groups = {w: None if w == world else dist.new_group(list(range(w))) for w in worlds}

    name = torch.cuda.get_device_name(device) if cuda else "CPU (gloo)"
    T = min(args.seq, shape.block_size)
    if rank == 0:
        print(f"{datetime.datetime.now():%Y-%m-%d %H:%M} | {name} | torch {torch.__version__} | launch world size "
              f"{world}, measured {worlds} | {args.what}, {args.layout} | {shape.n_layer} layers × {shape.n_embd} | "
              f"B={args.batch}/rank T={T} | {WARMUP} warm-up + {args.steps - WARMUP} timed steps per cell, "
              f"{args.rounds} rounds", flush=True)
    cells: dict[int, list[dict]] = {w: [] for w in worlds}
    for rnd in range(args.rounds):
        for w in worlds:
            dist.barrier()  # the ranks outside this world size wait here while it trains
            got = run_cell(args, shape, device, groups[w], w) if rank < w else {"peak_gib": 0.0}
            gc.collect()  # the cell's model and optimizer, gone with run_cell's frame, before the next cell
            if cuda:
                torch.cuda.empty_cache()
            peak = torch.tensor([got["peak_gib"]], device=device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            if rank == 0:
                got["peak_gib"] = peak.item()
                cells[w].append(got)
                print(f"  round {rnd + 1} | world {w} | {got['tokens_per_s']:,.0f} tok/s | "
                      f"{got['step_ms']:.1f} ms/step" + (f" | peak {got['peak_gib']:.2f} GiB/GPU" if cuda else ""),
                      flush=True)
    if rank == 0:
        params = cells[worlds[0]][0]["params_m"]
        print(f"\nparams {params:.1f}M; tok/s: all ranks' tokens per second of the median step (wall-clock), median "
              f"over {args.rounds} rounds [min–max]; speed-up: per round, tok/s over world 1's of the same round, "
              "the median [min–max]; efficiency = speed-up / world size")
        print("| what | layout | world | tok/s | step ms | peak GiB/GPU | speed-up × world 1 | efficiency |")
        print("|---|---|---|---|---|---|---|---|")
        for w, rows in cells.items():
            tps = [r["tokens_per_s"] for r in rows]
            speed, eff = "", ""
            if 1 in cells:
                ratios = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(rows, cells[1], strict=True)]
                speed = f"{statistics.median(ratios):.2f} [{min(ratios):.2f}–{max(ratios):.2f}]"
                eff = f"{statistics.median(ratios) / w:.2f}"
            peak = f"{max(r['peak_gib'] for r in rows):.2f}" if cuda else "n/a (CPU)"
            print(f"| {args.what} | {args.layout} | {w} × {name} | {statistics.median(tps):,.0f} "
                  f"[{min(tps):,.0f}–{max(tps):,.0f}] | {statistics.median(r['step_ms'] for r in rows):.1f} | "
                  f"{peak} | {speed} | {eff} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
