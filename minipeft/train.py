"""One training loop for everything: pretraining, full fine-tuning and every PEFT method.

AdamW updates only the parameters that require gradients (for a PEFT model, the adapter), with a linear
warmup then a cosine decay of the learning rate,

    lr(t) = lr · (t + 1) / warmup                                       for t < warmup (t counts from 0)
    lr(t) = lr · (m + (1 − m) · ½(1 + cos(π · (t − warmup) / (T − warmup))))   afterwards, m = min_lr_ratio

and the global gradient norm clipped to `grad_clip` (0: not clipped). On CUDA the forward runs under bf16
autocast. Under `torchrun` (torch.distributed initialised) the model is wrapped in DistributedDataParallel, which
all-reduces only the gradients of parameters that require them, so a frozen base is never synchronised;
a model already sharded with FSDP2 (minipeft.finetune) is trained as it is.

Gradient accumulation (`grad_accum` = K): a step runs K micro-batches of `batch_size` rows, each loss scaled by
1/K before its backward, then one optimizer step: the gradient of the mean of the K micro-batch losses, as one
batch of K·batch_size rows would give when every micro-batch holds as many supervised tokens (under DDP the
gradients are all-reduced once, on the K-th backward).

With a run directory, what a user sees (minipeft/run_log.py): a progress bar with loss, tokens/s and ETA,
RUN/metrics.jsonl (one line per step) and RUN/loss.png; and every `save_every` steps a training checkpoint
(minipeft/train_state.py) from which `resume=True` continues with the same result as an uninterrupted run.
AdamW: Loshchilov & Hutter 2019, https://arxiv.org/abs/1711.05101.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from minipeft.checkpoint import check_output_dir, save_model
from minipeft.checks import is_finite, shown
from minipeft.run_log import METRICS_NAME, PLOT_NAME, MetricsLog, plot_losses
from minipeft.train_state import load_train_state, save_train_state

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # idx, targets, attention_mask
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    steps: int = 300
    lr: float = 3e-3
    batch_size: int = 16
    grad_accum: int = 1  # micro-batches of batch_size rows per optimizer step (gradient accumulation)
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # the largest global gradient norm; 0 turns clipping off
    eval_every: int = 0  # 0: evaluate once, at the end (when an eval_fn is given)
    seed: int = 0
    # torch.compile the model's forward and loss (the backward follows through AOTAutograd). None: on when the
    # model is on CUDA, off on the CPU (compiling a small CPU model costs more than it saves).
    compile: bool | None = None
    compile_backend: str = "inductor"  # torch.compile's backend; tests use "aot_eager" (no C++ compiler needed)
    # Inductor's mode. "reduce-overhead" replays the forward and backward as CUDA graphs, so the host leaves
    # the loop: on the H200 a GPT-2-small LoRA step ran 3.08× faster than eager, and about as much faster than
    # compiled without graphs (1.01× eager), which stays host-bound on the Triton op's Python launch
    # (benchmarks/RESULTS.md, "End to end", 2026-12-02). Batches
    # are then padded to a multiple of `pad_multiple` tokens, so a few shapes are recorded, not one per batch.
    compile_mode: str | None = "reduce-overhead"
    pad_multiple: int = 64  # >= 1; 1: batches are not padded (a compiled run then records a shape per length)

    def __post_init__(self) -> None:
        if self.compile is not None and not isinstance(self.compile, bool):
            raise TypeError(f"TrainConfig.compile must be True, False or None, got {self.compile!r}")
        if not isinstance(self.compile_backend, str):  # a name: the config is written to checkpoints as JSON
            raise TypeError(f"TrainConfig.compile_backend must be a str naming a torch.compile backend (e.g. "
                            f"'inductor', 'aot_eager'), got {type(self.compile_backend).__name__} "
                            f"{self.compile_backend!r}")
        if not self.compile_backend:
            raise ValueError("TrainConfig.compile_backend must name a torch.compile backend (e.g. 'inductor', "
                             "'aot_eager'), got ''")
        if self.compile_mode is not None and not isinstance(self.compile_mode, str):
            raise TypeError(f"TrainConfig.compile_mode must be one of {COMPILE_MODES}, got "
                            f"{type(self.compile_mode).__name__} {self.compile_mode!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"TrainConfig.compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        for name in ("steps", "batch_size", "grad_accum", "warmup_steps", "eval_every", "seed", "pad_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"TrainConfig.{name} must be an int, got {type(value).__name__} {value!r}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"TrainConfig.{name} must be a real number, got {type(value).__name__} {value!r}")
            if not is_finite(value):
                raise ValueError(f"TrainConfig.{name} must be finite, got {shown(value)}")
        if not 0 <= self.seed < 2**63:  # torch.manual_seed(seed + rank) takes at most 64 bits
            raise ValueError(f"TrainConfig.seed must be an int in [0, 2**63), got {self.seed!r}")
        if self.pad_multiple < 1:  # one way to say "no padding": a multiple of 1
            raise ValueError(f"TrainConfig.pad_multiple must be >= 1 (1: batches are not padded), got "
                             f"{self.pad_multiple!r}")
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError(f"TrainConfig.steps and batch_size must be > 0, got {self.steps!r}, {self.batch_size!r}")
        if self.grad_accum <= 0:
            raise ValueError(f"TrainConfig.grad_accum must be > 0, got {self.grad_accum!r}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"TrainConfig.warmup_steps, eval_every, weight_decay and grad_clip must be >= 0, "
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


class TrainingDivergedError(ValueError):
    """The loss, or a trained weight, stopped being finite (NaN or ±inf): the run diverged. `train` raises it at
    the step where it was seen, before that step is logged or checkpointed and without saving the model."""

    def __init__(self, message: str, step: int | None = None) -> None:  # step optional: pickling passes message
        super().__init__(message)
        self.step = step  # the 1-based step at which the loss or the weights were found not finite


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate at `step` (0-based): linear warmup, then cosine decay to lr·min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


DEVICE_TYPES = ("cpu", "cuda", "mps")  # what the training loop and the kernels are written for


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' is CUDA when available, else CPU; otherwise a CPU, CUDA ('cuda', 'cuda:1') or MPS device that
    this machine has.

    Raises:
        TypeError: `device` is neither a str nor a torch.device.
        ValueError: `device` names no device of DEVICE_TYPES, or one this machine does not have.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be {expected} (a str) or a torch.device, got {type(device).__name__} "
                        f"{device!r}")
    try:
        resolved = torch.device(device)
    except RuntimeError:  # torch's own message lists every device type it was built with
        resolved = None
    if resolved is None or resolved.type not in DEVICE_TYPES:
        raise ValueError(f"device must be {expected}, got {str(device)!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available here")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA device(s), cuda:0 to "
                             f"cuda:{count - 1}")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but MPS is not available here")
    return resolved


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


def _check_run_args(run_dir, save_every, resume, model: torch.nn.Module) -> None:
    if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 0:
        raise ValueError(f"save_every must be an int >= 0 (0: no training checkpoints), got {save_every!r}")
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {type(resume).__name__} {resume!r}")
    if run_dir is None and (save_every or resume):
        raise ValueError(f"save_every={save_every} / resume={resume} need a run_dir: the directory that holds the "
                         "training checkpoints")
    if run_dir is not None:
        check_output_dir(run_dir, label="run_dir")
    if (save_every or resume) and _is_fsdp(model):
        raise ValueError("train: training checkpoints (save_every / resume) of an FSDP-sharded model are not "
                         "supported (its parameters and optimizer state are sharded across ranks); use DDP")


def _random_state(generator: torch.Generator, world: int) -> dict[str, torch.Tensor]:
    """torch's RNG state of every rank (gathered: dropout differs per rank) and the batch generator's state."""
    mine = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mine["cuda"] = torch.cuda.get_rng_state()
    states = [mine]
    if world > 1:
        states = [None] * world
        dist.all_gather_object(states, mine)
    out = {f"{kind}.rank{r}": value for r, state in enumerate(states) for kind, value in state.items()}
    out["generator"] = generator.get_state()
    return out


def _restore_random_state(state: dict[str, torch.Tensor], generator: torch.Generator, rank: int,
                          device: torch.device) -> None:
    torch.set_rng_state(state[f"torch.rank{rank}"])
    if device.type == "cuda" and f"cuda.rank{rank}" in state:
        torch.cuda.set_rng_state(state[f"cuda.rank{rank}"], device)
    generator.set_state(state["generator"])


def _restore_batches(get_batch, state: dict | None) -> None:
    """Put a stateful get_batch (one with state_dict / load_state_dict, e.g. EpochBatches) where it was."""
    if state is None:
        return
    load = getattr(get_batch, "load_state_dict", None)
    if not callable(load):
        raise ValueError("the checkpoint holds get_batch's position (it had a state_dict), but this get_batch has "
                         "no load_state_dict to restore it; pass the same kind of get_batch as the run that made it")
    load(state)


def _padded_length(model: torch.nn.Module, T: int, multiple: int) -> int:
    """T rounded up to a multiple of `multiple`, but never past the positions the model has left for tokens
    (block_size minus the virtual tokens of an active prompt or prefix)."""
    if multiple <= 1 or T % multiple == 0:
        return T
    gpt = getattr(model, "base_model", model)
    room = gpt.config.block_size - int(getattr(model, "num_virtual_tokens", 0))
    return max(T, min(-(-T // multiple) * multiple, room))


def _check_finite_parameters(model: torch.nn.Module, params: list[torch.nn.Parameter], step: int,
                             world: int = 1) -> None:
    """TrainingDivergedError unless every trained parameter is finite, on every rank at once (a collective when
    world > 1: under FSDP2 each rank sees only its shard, and a rank that raised alone would leave the others
    waiting). One device sync: it runs before a save, which waits on the device anyway, not every step. A finite
    loss can still have overflowed gradients, and the optimizer step after them leaves NaN weights that no loss
    has shown yet."""
    names = {id(p): n for n, p in model.named_parameters()}
    shards = [p.to_local() if hasattr(p, "to_local") else p for p in params]  # FSDP2: this rank's shard
    finite = torch.stack([torch.isfinite(t.detach()).all() for t in shards])
    all_finite = finite.all().to(torch.float32)
    if world > 1:
        dist.all_reduce(all_finite, op=dist.ReduceOp.MIN)
    if bool(all_finite):
        return
    bad = [names.get(id(p), "?") for p, ok in zip(params, finite.tolist(), strict=True) if not ok]
    bad = bad or ["of another rank's shard"]
    listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    raise TrainingDivergedError(f"train: after step {step} the trained weights {listed} are not finite (NaN or inf: "
                                "a gradient overflowed); they were not saved. Lower lr or keep grad_clip on", step)


def pad_batch(idx: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None,
              length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-pad a batch (idx, targets (B, T), attention_mask (B, T) or None) to `length` tokens: the new
    positions are masked out (mask 0) and predict nothing (target -100), so the loss is unchanged. idx is
    padded with token 0: under the causal mask no real token ever attends to a later (padded) position."""
    pad = length - idx.shape[1]
    if pad <= 0:
        return idx, targets, mask
    if mask is None:
        mask = torch.ones_like(idx)
    widen = lambda t, value: torch.nn.functional.pad(t, (0, pad), value=value)  # noqa: E731
    return widen(idx, 0), widen(targets, -100), widen(mask, 0)


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
    run_dir: str | Path | None = None,
    save_every: int = 0,
    resume: bool = False,
) -> TrainResult:
    """Train the parameters of `model` that require grad; returns the losses, evaluations and speed.

    get_batch(generator) returns the GLOBAL batch (idx, targets, attention_mask or None) on any device.
    Every rank draws the same global batch from the same seed and keeps its rows rank, rank+W, …, so N
    ranks with batch_size B take the same steps as one process with batch B (the gradient of the mean
    loss is the mean of the ranks' gradients when each row carries the same number of targets).
    With grad_accum = K, get_batch is called K times per step. A get_batch that has state_dict() and
    load_state_dict() (`minipeft.jsonl.EpochBatches`) has its state saved in training checkpoints.
    eval_fn(model) returns a dict of metrics, called every `eval_every` steps and at
    the end. loss_fn(net, idx, targets, attention_mask) replaces the model's own next-token loss (see
    `minipeft.data.verbalizer_loss`). With `checkpoint_dir`, rank 0 saves the model there at the end through
    `minipeft.checkpoint.save_model` (a GPT: the whole network; a PeftModel: its adapters); the path is
    checked before the first step, on every rank, so that a bad one fails at once and everywhere.

    With `run_dir`, rank 0 writes run_dir/metrics.jsonl (a line per step) and run_dir/loss.png; with
    `save_every` = N > 0, a training checkpoint every N steps in run_dir/checkpoints (minipeft/train_state.py);
    `resume=True` loads the last one (same config, same model and method) and continues from it, with the same
    result as a run that never stopped. Without resume, a run_dir's metrics.jsonl is started afresh.

    The model trains in train mode and is left in eval mode, ready to be evaluated or sampled.

    Raises:
        TrainingDivergedError (a ValueError): a step's loss is NaN or infinite (checked every step), or a
            trained weight is (checked before each training checkpoint and at the end). Nothing is saved after
            it: neither that step's checkpoint nor `checkpoint_dir`, and callers that save the returned model
            (minipeft.finetune) never get it.
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
    _check_run_args(run_dir, save_every, resume, model)
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
    ddp = net if isinstance(net, DistributedDataParallel) else None  # for no_sync() while accumulating
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    compiling = bool(config.compile or (config.compile is None and device.type == "cuda"))
    if compiling:  # a mode is Inductor's option: other backends refuse one
        mode = config.compile_mode if config.compile_backend == "inductor" else None
        net = torch.compile(net, backend=config.compile_backend, mode=mode)
    pad_to = config.pad_multiple if compiling else 1

    result = TrainResult()
    first_step = 0
    if resume:
        saved = load_train_state(run_dir, model, optimizer, asdict(config), world)
        first_step = saved["step"]
        record = saved["record"]
        result.losses, result.tokens, result.seconds = list(record["losses"]), record["tokens"], record["seconds"]
        result.evals = [(step, metrics) for step, metrics in record["evals"]]
        _restore_random_state(saved["random"], generator, rank, device)
        _restore_batches(get_batch, saved["batches"])
    writes = run_dir is not None and rank == 0
    log = MetricsLog(Path(run_dir) / METRICS_NAME, first_step if resume else None) if writes else None
    model.train()
    bar = tqdm(range(first_step, config.steps), initial=first_step, total=config.steps, desc=desc,
               disable=not progress or rank != 0, leave=False)
    start = time.perf_counter() - result.seconds  # a resumed run's clock goes on from the checkpoint's
    for step in bar:
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # summed on the device, so that a step syncs once; in float64 where the device has it (MPS does not)
        step_loss = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
        for micro in range(config.grad_accum):
            batch = get_batch(generator)
            idx, targets, mask = (t[rank::world] if t is not None else None for t in batch)  # this rank's rows
            result.tokens += int(mask.sum()) if mask is not None else idx.numel()  # counted before the copy
            idx, targets, mask = (t.to(device) if t is not None else None for t in (idx, targets, mask))
            idx, targets, mask = pad_batch(idx, targets, mask, _padded_length(model, idx.shape[1], pad_to))
            last_micro = micro + 1 == config.grad_accum
            with contextlib.nullcontext() if ddp is None or last_micro else ddp.no_sync():  # all-reduce on the last
                with autocast:
                    if loss_fn is None:
                        _, loss = net(idx, targets=targets, attention_mask=mask, return_logits=False)  # chunked loss
                    else:
                        loss = loss_fn(net, idx, targets, mask)
                (loss / config.grad_accum if config.grad_accum > 1 else loss).backward()
            step_loss += loss.detach().to(step_loss.dtype) / config.grad_accum
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:  # every rank must stop together: a rank that raised alone would leave the others waiting
            any_bad = (~torch.isfinite(step_loss)).to(torch.float32)   # in the next step's all-reduce
            dist.all_reduce(any_bad, op=dist.ReduceOp.MAX)
            step_loss, any_bad = torch.stack([step_loss.float(), any_bad]).tolist()  # the step's one sync
        else:
            step_loss, any_bad = step_loss.item(), 0.0
        # Checked on the value that the step's one sync just read, so it costs no extra wait; the optimizer
        # step was already queued before that sync, so the weights have taken the non-finite gradients.
        if not math.isfinite(step_loss) or any_bad:
            where = f"is {step_loss} (not finite)" if not math.isfinite(step_loss) else "is not finite on another rank"
            raise TrainingDivergedError(
                f"train: the loss at step {step + 1} of {config.steps} {where}: the run "
                f"diverged. The optimizer had already stepped on its gradients, so the model's trained weights "
                f"are not finite; they were not saved. Lower lr (it was {lr:.3g} at this step), keep grad_clip "
                "on, or check the data and the loss_fn", step + 1)
        result.losses.append(step_loss)
        tokens_per_second = result.tokens / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_per_second:,.0f}")
        line = {"step": step + 1, "loss": step_loss, "lr": lr, "tokens_per_second": tokens_per_second}
        paused = time.perf_counter()  # evaluation and checkpoints are not training time
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
            line.update({f"eval_{k}": v for k, v in metrics.items()})
            bar.set_postfix(loss=f"{step_loss:.3f}", **{f"eval_{k}": f"{v:.3f}" for k, v in metrics.items()})
        if log is not None:
            log.write(line)
        if save_every and (step + 1) % save_every == 0:
            random_state = _random_state(generator, world)  # a collective under DDP: every rank takes part
            _check_finite_parameters(model, params, step + 1, world)  # a checkpoint of NaN weights would resume NaN
            if writes:
                batches = getattr(get_batch, "state_dict", None)
                result.seconds = paused - start
                save_train_state(run_dir, step + 1, model, optimizer, random_state, asdict(config),
                                 {"losses": result.losses, "evals": result.evals, "tokens": result.tokens,
                                  "seconds": result.seconds}, batches() if callable(batches) else None, world)
                plot_losses(Path(run_dir) / PLOT_NAME, result.losses, result.evals, desc)
        start += time.perf_counter() - paused
    if device.type == "cuda":
        torch.cuda.synchronize()
    result.seconds = time.perf_counter() - start
    # on every rank, agreed between them: a caller saves the returned model (minipeft.finetune)
    _check_finite_parameters(model, params, config.steps, world)
    model.eval()
    if writes:
        plot_losses(Path(run_dir) / PLOT_NAME, result.losses, result.evals, desc)
    if checkpoint_dir is not None and rank == 0:
        save_model(model, checkpoint_dir)
    return result
