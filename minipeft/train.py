"""One training loop for everything: pretraining, full fine-tuning and every PEFT method.

AdamW updates only the parameters that require gradients (for a PEFT model, the adapter), with a linear
warmup then a cosine decay of the learning rate,

    lr(t) = lr · t / warmup                                             for t < warmup
    lr(t) = lr · (m + (1 − m) · ½(1 + cos(π · (t − warmup) / (T − warmup))))   afterwards, m = min_lr_ratio

and the global gradient norm clipped to `grad_clip`. On CUDA the forward runs under bf16 autocast. Under
`torchrun` (torch.distributed initialised) the model is wrapped in DistributedDataParallel, which
all-reduces only the gradients of parameters that require them, so a frozen base is never synchronised;
a model already sharded with FSDP2 (minipeft.finetune) is trained as it is.
AdamW: Loshchilov & Hutter 2019, https://arxiv.org/abs/1711.05101.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from minipeft.checkpoint import check_output_dir, save_model

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # idx, targets, attention_mask
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass
class TrainConfig:
    steps: int = 300
    lr: float = 3e-3
    batch_size: int = 16
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 0  # 0: evaluate once, at the end (when an eval_fn is given)
    seed: int = 0
    # torch.compile the model's forward and loss (the backward follows through AOTAutograd). None: on when the
    # model is on CUDA, off on the CPU (compiling a small CPU model costs more than it saves).
    compile: bool | None = None
    compile_backend: str = "inductor"  # torch.compile's backend; tests use "aot_eager" (no C++ compiler needed)

    def __post_init__(self) -> None:
        if self.compile is not None and not isinstance(self.compile, bool):
            raise TypeError(f"TrainConfig.compile must be True, False or None, got {self.compile!r}")
        for name in ("steps", "batch_size", "warmup_steps", "eval_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"TrainConfig.{name} must be an int, got {type(value).__name__} {value!r}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"TrainConfig.{name} must be a real number, got {type(value).__name__} {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"TrainConfig.{name} must be finite, got {value!r}")
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError(f"TrainConfig.steps and batch_size must be > 0, got {self.steps!r}, {self.batch_size!r}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise ValueError(f"TrainConfig.warmup_steps, eval_every and weight_decay must be >= 0 and grad_clip > 0, "
                             f"got {self.warmup_steps!r}, {self.eval_every!r}, {self.weight_decay!r}, "
                             f"{self.grad_clip!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, dict]] = field(default_factory=list)  # (step, metrics)
    tokens: int = 0  # real (non-padding) tokens seen by this rank
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate at `step` (0-based): linear warmup, then cosine decay to lr·min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' is CUDA when available, else CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available here")
    return torch.device(device)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_fsdp(model: torch.nn.Module) -> bool:
    try:  # here, not at the top: torch builds without distributed support have no torch.distributed.fsdp
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def train(
    model: torch.nn.Module,
    get_batch: Callable[[torch.Generator], Batch],
    config: TrainConfig,
    *,
    eval_fn: Callable[[torch.nn.Module], dict] | None = None,
    loss_fn: LossFn | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    desc: str = "train",
) -> TrainResult:
    """Train the parameters of `model` that require grad; returns the losses, evaluations and speed.

    get_batch(generator) returns the GLOBAL batch (idx, targets, attention_mask or None) on any device.
    Every rank draws the same global batch from the same seed and keeps its rows rank, rank+W, …, so N
    ranks with batch_size B take the same steps as one process with batch B (the gradient of the mean
    loss is the mean of the ranks' gradients when each row carries the same number of targets).
    eval_fn(model) returns a dict of metrics, called every `eval_every` steps and at
    the end. loss_fn(net, idx, targets, attention_mask) replaces the model's own next-token loss (see
    `minipeft.data.verbalizer_loss`). With `checkpoint_dir`, rank 0 saves the model there at the end through
    `minipeft.checkpoint.save_model` (a GPT: the whole network; a PeftModel: its adapters); the path is
    checked before the first step, on every rank, so that a bad one fails at once and everywhere.
    """
    if getattr(model, "merged_adapters", None):  # a PeftModel's LoRA folded into the base: nothing would learn
        raise ValueError(f"train: adapters {model.merged_adapters} are merged into the base weights; call "
                         "unmerge_adapter() before training")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train: the model has no parameters that require grad (is everything frozen?)")
    if checkpoint_dir is not None:
        check_output_dir(checkpoint_dir, label="checkpoint_dir")
        if _is_fsdp(model):
            raise ValueError("train: checkpoint_dir cannot save an FSDP-sharded model from rank 0 alone; gather "
                             "its full state dict first (minipeft.finetune.full_state_dict) and save that")
    device = next(model.parameters()).device
    rank, world = _rank_and_world()
    if config.batch_size % world:
        raise ValueError(f"batch_size ({config.batch_size}) must be divisible by the number of ranks ({world})")
    torch.manual_seed(config.seed + rank)  # dropout masks and any init done during training
    generator = torch.Generator().manual_seed(config.seed)  # the same global batches on every rank

    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95), foreach=device.type == "cuda",
    )
    net = model
    if world > 1 and not _is_fsdp(model):  # an FSDP2-sharded model already reduces its own gradients
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    if config.compile or (config.compile is None and device.type == "cuda"):
        net = torch.compile(net, backend=config.compile_backend)

    result = TrainResult()
    model.train()
    bar = tqdm(range(config.steps), desc=desc, disable=not progress or rank != 0, leave=False)
    start = time.perf_counter()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        batch = get_batch(generator)
        idx, targets, mask = (t[rank::world].to(device) if t is not None else None for t in batch)  # this rank's rows
        with autocast:
            if loss_fn is None:
                _, loss = net(idx, targets=targets, attention_mask=mask, return_logits=False)  # chunked loss
            else:
                loss = loss_fn(net, idx, targets, mask)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss.item())
        result.tokens += int(mask.sum()) if mask is not None else idx.numel()
        bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
        last = step + 1 == config.steps
        if eval_fn is not None and (last or (config.eval_every and (step + 1) % config.eval_every == 0)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            paused = time.perf_counter()
            model.eval()
            with torch.no_grad(), autocast:
                metrics = eval_fn(model)
            model.train()
            result.evals.append((step + 1, metrics))
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}", **{k: f"{v:.3f}" for k, v in metrics.items()})
            start += time.perf_counter() - paused  # evaluation time is not training time
    if device.type == "cuda":
        torch.cuda.synchronize()
    result.seconds = time.perf_counter() - start
    model.eval()
    if checkpoint_dir is not None and rank == 0:
        save_model(model, checkpoint_dir)
    return result
