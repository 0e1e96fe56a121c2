"""Scale-out benchmark: LoRA / QLoRA fine-tuning across GPUs with DDP and FSDP2 (issue: scale out).

Run one configuration per launch, under torchrun, and compare the rows it prints:

    torchrun --nproc_per_node 1 benchmarks/scale.py throughput              # GPT-2-medium shape, LoRA, DDP
    torchrun --nproc_per_node 2 benchmarks/scale.py throughput              # ... speed-up = tok/s ratio
    torchrun --nproc_per_node 2 benchmarks/scale.py memory --layout ddp     # 7B shape, QLoRA, peak GiB per GPU
    torchrun --nproc_per_node 2 benchmarks/scale.py memory --layout fsdp

Random weights (no checkpoint is needed to measure speed or memory), bf16 autocast, T=512, AdamW on the
adapter. Throughput counts tokens of all ranks per second of the median step after 3 warm-up steps
(minipeft.measure). Memory is `torch.cuda.max_memory_allocated` per rank. `--shape tiny --device cpu` is a
smoke test that runs on CPUs (gloo). Keep NVLink multicast off on shared hosts: NCCL_NVLS_ENABLE=0
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 (set below when unset).
"""

from __future__ import annotations

import argparse
import os

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["throughput", "memory"])
    p.add_argument("--layout", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--shape", choices=list(SHAPES), default=None, help="default: medium (throughput), 7b (memory)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--batch", type=int, default=8, help="sequences per rank")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    shape = SHAPES[args.shape or ("medium" if args.what == "throughput" else "7b")]
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
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
        net = torch.nn.parallel.DistributedDataParallel(pm, device_ids=[device.index] if cuda else None)
    opt = torch.optim.AdamW([q for q in pm.parameters() if q.requires_grad], lr=1e-4)
    if cuda:
        reset_peak_memory(device)
    T = min(args.seq, shape.block_size)
    batches = iter([torch.randint(0, shape.vocab_size, (args.batch, T), device=device) for _ in range(args.steps)])

    def step() -> None:
        idx = next(batches)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            _, loss = net(idx, targets=idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_ms = median_ms(step, repeats=args.steps - 3, warmup=3)  # synchronises CUDA around each timed step
    tokens_per_s = world * args.batch * T / (step_ms / 1000)
    peak = torch.tensor([peak_memory_mb(device) / 1024 if cuda else 0.0], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        name = torch.cuda.get_device_name(device) if cuda else "CPU"
        print(f"| {args.what} | {args.layout} | {world} × {name} | params {model.num_parameters() / 1e6:.0f}M | "
              f"B={args.batch}/rank T={T} | {tokens_per_s:,.0f} tok/s | peak {peak.item():.2f} GiB/GPU |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
