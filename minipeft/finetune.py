"""Fine-tune one method on one task, on one process or many (`minipeft finetune`, also under `torchrun`).

Scaling out goes through torch.distributed, not through anything home-made:

- DDP (default under torchrun): every rank holds the whole frozen base and the adapter. Each rank takes
  its rows of the same global batch, and after backward DistributedDataParallel all-reduces the gradients
  of the parameters that require them, that is the adapter's only: the frozen base is never synchronised.
- FSDP2 (`--fsdp`): `torch.distributed.fsdp.fully_shard` shards every block, the GPT and the wrapper, so
  each rank stores 1/N of every parameter, frozen or not, and all-gathers a block's weights just before
  it runs (and again for backward). That is what lets a base too large for one GPU be adapted. A 4-bit
  base (QLoRA) is sharded too, as whole quantization blocks: its packed state is first re-held as frozen
  uint8 parameters, one row per block (minipeft/quant/nf4_blocks.py). Paper: Zhao et al. 2023, PyTorch
  FSDP, https://arxiv.org/abs/2304.11277.

Whatever the layout, rank 0 alone writes the result (the adapter, or for full fine-tuning the model),
atomically, after the weights were gathered; a file written by N ranks loads into a 1-process model.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from minipeft.checkpoint import check_output_dir, save_model
from minipeft.data import load_task, task_batch, task_loss
from minipeft.evaluate import evaluate
from minipeft.methods import METHODS
from minipeft.pretrain import _check_preset, base_dir, load_base
from minipeft.quant import NF4Linear
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import TrainConfig, resolve_device, train

if TYPE_CHECKING:  # torch builds without distributed support lack torch.distributed.fsdp
    from torch.distributed.fsdp import MixedPrecisionPolicy


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or (dist.is_available() and dist.is_initialized()):
        rank = dist.get_rank() if world > 1 else 0
        return rank, world, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def shard_fsdp(model: torch.nn.Module, mp_policy: MixedPrecisionPolicy | None = None) -> None:
    """FSDP2: shard each transformer block, then the GPT, then the wrapper (each is one all-gather unit).

    Every NF4Linear first re-holds its 4-bit state as frozen uint8 parameters of whole quantization blocks
    (``NF4Linear.to_block_parameters``): FSDP2 shards parameters, never buffers, so each rank keeps ≈ 1/N of
    the 4-bit weight and a block's unit all-gathers its layers' codes and statistics for forward and again
    for backward. ``mp_policy`` (a ``torch.distributed.fsdp.MixedPrecisionPolicy``; None: no casts) applies
    to every unit; its ``param_dtype`` casts floating parameters only, and the NF4 statistics travel as bytes,
    so a bf16 policy leaves the fp32 absmax exact.
    """
    # here: torch builds without distributed support lack torch.distributed.fsdp
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mp_policy is not None and not isinstance(mp_policy, MixedPrecisionPolicy):
        raise TypeError(f"mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy or None, got "
                        f"{type(mp_policy).__name__}")  # fmt: skip
    for layer in model.modules():
        if isinstance(layer, NF4Linear):
            layer.to_block_parameters()
    policy = MixedPrecisionPolicy() if mp_policy is None else mp_policy
    gpt = model.base_model if hasattr(model, "base_model") else model
    for block in gpt.transformer.h:
        fully_shard(block, mp_policy=policy)
    if gpt is not model:
        fully_shard(gpt, mp_policy=policy)  # its own unit, so that GPT.generate (which calls the GPT) gathers it
    fully_shard(model, mp_policy=policy)


def finetune(method: str, task_name: str = "sentiment", steps: int = 150, lr: float | None = None,
             preset: str = "default", seed: int = 0, device: str = "auto", out: str | Path | None = None,
             batch_size: int = 16, fsdp: bool = False, progress: bool = True, compile: bool | None = None) -> dict:
    """Train `method` (a key of minipeft.methods.METHODS) on the task; returns its record (on every rank):
    losses, speed, the trained weights ("trainable", full tensors) and, on rank 0, the test metric.

    Under torchrun this joins the process group; rank 0 pretrains the base if none is cached while the
    others wait. With `out`, rank 0 writes the adapter (minipeft format) or, for "full", the model, through
    minipeft.checkpoint.save_model.

    Every argument is checked first, before the base is loaded (which may pretrain it for minutes):
    ValueError or TypeError naming the argument. A run whose loss stops being finite raises
    minipeft.train.TrainingDivergedError and writes nothing to `out`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    spec = METHODS[method]
    _check_preset(preset)
    # TrainConfig checks steps, lr, batch_size, seed and compile; the warmup is set once steps is a known int
    cfg = TrainConfig(steps=steps, lr=spec.lr if lr is None else lr, batch_size=batch_size, warmup_steps=0,
                      seed=seed, compile=compile)
    cfg = dataclasses.replace(cfg, warmup_steps=max(1, min(10, steps // 10)))
    for name, value in (("fsdp", fsdp), ("progress", progress)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    dev = resolve_device(device)
    if out is not None:
        check_output_dir(out, label="out")
        if Path(out).resolve() == base_dir(preset, seed).resolve():
            raise ValueError(f"out {str(out)!r} is the cached base model's directory; write the result elsewhere")
    tok, task = ByteTokenizer(), load_task(task_name, seed=seed)  # checks task_name (its own RNG, not torch's)
    rank, world, dev = init_distributed(dev)
    if fsdp and world == 1:
        raise ValueError("fsdp=True needs several processes: run under `torchrun --nproc_per_node N`")
    if rank == 0:
        load_base(preset, seed, device="cpu", progress=progress)  # pretrain and cache once
    if world > 1:
        dist.barrier()
    torch.manual_seed(seed)
    base = load_base(preset, seed, device=str(dev), train_if_missing=False)
    model = spec.build(base, task, tok).to(dev)
    if fsdp:
        shard_fsdp(model)
    result = train(model, lambda g: task_batch(task, tok, batch_size, base.config.block_size, g), cfg,
                   loss_fn=task_loss(task, tok), progress=progress, desc=f"{method} on {task_name}")
    record = {"method": method, "task": task_name, "steps": steps, "lr": cfg.lr, "world_size": world,
              "fsdp": fsdp, "final_loss": result.losses[-1], "losses": result.losses,
              "tokens_per_second": result.tokens_per_second * world, "metric": None}
    state = full_state_dict(model, fsdp)  # a collective under FSDP: every rank takes part
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    record["trainable"] = {k: v.detach().clone() for k, v in state.items() if k in trained}
    if rank == 0:
        # Evaluate and save from a plain 1-process copy: the proof that the gathered weights are complete.
        local = spec.build(load_base(preset, seed, device=str(dev), train_if_missing=False), task, tok).to(dev)
        local.load_state_dict(state)
        record["metric"] = evaluate(local, task, tok, "test")
        if out is not None:
            save_model(local, out)  # the gathered copy: complete on one process whatever the layout
    if world > 1:
        dist.barrier()
    return record


def full_state_dict(model: torch.nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The model's complete state dict as plain tensors (FSDP2's shards all-gathered)."""
    if not fsdp:
        return model.state_dict()
    # here: torch builds without distributed support lack torch.distributed.checkpoint
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
