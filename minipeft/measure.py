"""Measuring what the PEFT overview's table claims: wall-clock latency, peak memory, the bytes a training step holds.

Every latency in minipeft (the `compare` table, the chapters, the CPU timings of the benchmarks) is one
statistic: the MEDIAN of `repeats` timed calls, taken after `warmup` untimed ones,

    t̂ = median(t₁, …, t_R),   tᵢ = wall time of call i, after W warm-up calls.

Why the median. Timings on a shared machine are skewed: most runs cluster near the true cost and a few are
much slower (another process took the core, the allocator grew, a page fault). The mean is pulled up by
those few; the minimum reports the luckiest run, whose luck differs between candidates, so ratios of minima
are noisy too. The median is the typical run and moves only when more than half the runs change.
Why the warm-up: the first call pays one-time costs (lazy initialisation, kernel compilation, caches), which
are not the steady state a user sees on every later call. Several candidates are timed ROUND-ROBIN (a, b, c,
a, b, c, …), so a slow moment of the machine hits all of them alike instead of one whole series.
On CUDA the device is synchronised before and after each timed call (launches are asynchronous; without it
the clock would time only the launch). GPU kernels in benchmarks/ keep `triton.testing.do_bench` (CUDA
events, its own median), the GPU's statistic.

Memory. On CUDA, the allocator's peak (`torch.cuda.max_memory_allocated`) since a reset. On the CPU, the
peak resident set size of the process (VmHWM in /proc/self/status, reset through /proc/self/clear_refs):
a process's memory never shrinks back, so a fair measure runs in a fresh process and subtracts the memory in
use before the thing measured was built (what `reset_peak_memory` returns).
"""

from __future__ import annotations

import copy
import ctypes
import gc
import resource
import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


# ------------------------------------------------------------------------------------------ latency
def _synchronize_cuda() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def round_robin_ms(candidates: Mapping[K, Callable[[], object]], repeats: int = 5, warmup: int = 1, *,
                   synchronize: bool = True) -> dict[K, float]:
    """Median milliseconds per call of each candidate, the candidates called in turn.

    Runs `warmup` untimed rounds, then `repeats` timed rounds; a round calls every candidate once, in the
    mapping's order. With `synchronize` (the default) CUDA is synchronised around each timed call, so the
    time is the work's and not only its launch; `synchronize=False` times the host alone (Python and
    launches), for measuring launch overhead.

    Example: round_robin_ms({"base": lambda: f(x), "lora": lambda: g(x)}, repeats=7) -> {"base": 1.9, "lora": 2.4}
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    samples: dict[K, list[float]] = {key: [] for key in candidates}
    for round_ in range(warmup + repeats):
        for key, fn in candidates.items():
            if round_ < warmup:
                fn()
                continue
            if synchronize:
                _synchronize_cuda()
            start = time.perf_counter()
            fn()
            if synchronize:
                _synchronize_cuda()
            samples[key].append(1000 * (time.perf_counter() - start))
    return {key: statistics.median(ms) for key, ms in samples.items()}


def median_ms(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, *, synchronize: bool = True) -> float:
    """Median milliseconds per call of `fn` over `repeats` timed calls after `warmup` untimed ones."""
    return round_robin_ms({"fn": fn}, repeats, warmup, synchronize=synchronize)["fn"]


def cuda_graph(fn: Callable[[], T], warmup: int = 2) -> Callable[[], T]:
    """fn captured once in a CUDA graph; returns a function that replays it and returns fn's output.

    A replay launches the whole recorded sequence of kernels in one call, so the host's Python and launch
    time leave the measurement (and the loop): what a serving engine does for its steady-state shapes. The
    replay reads its inputs from the very tensors fn read at capture (copy new values into them to run on new
    data) and writes the same output tensors every time; every other tensor it reads must outlive the graph (a
    graph keeps addresses, not references). fn must not wait for the host during capture (no ``.item()``, no
    host→device copy); `warmup` eager calls first, on a side stream as PyTorch asks, make what fn makes once
    (cached tensors, cuBLAS handles, Triton compiles)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> T:
        graph.replay()
        return out

    return replay


@torch.no_grad()
def generation_ms_per_token(models: Mapping[K, nn.Module], idx: torch.Tensor, new_tokens: int = 32,
                            repeats: int = 5, warmup: int = 1) -> dict[K, float]:
    """Median milliseconds per generated token of greedy generation (`model.generate`, KV cache) from `idx`
    (B, T), the models timed round-robin. The models are timed as they are: put them in eval mode first."""
    calls = {key: (lambda m=m: m.generate(idx, max_new_tokens=new_tokens)) for key, m in models.items()}
    return {key: ms / new_tokens for key, ms in round_robin_ms(calls, repeats, warmup).items()}


# ------------------------------------------------------------------------------------------ memory
def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak) of this process, in MiB, from /proc/self/status (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _release_freed_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the OS (glibc's ``malloc_trim``), so that the
    resident set read next is what the process holds now. Without it, memory freed before a baseline but still
    resident can be returned later, mid-measurement, and the peak minus the baseline comes out negative."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc: the baseline is only as tight as the allocator keeps it
        pass


def _reset_peak_rss() -> None:
    """Start a new peak: writing 5 to clear_refs resets VmHWM to the current RSS (Linux ≥ 4.0). Without it,
    the peak would be whatever loading the base cost, and training would not show."""
    _release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def reset_peak_memory(device: torch.device | str) -> float:
    """Start a new peak on `device` and return the memory in use now (MiB), the baseline to subtract from
    `peak_memory_mb`: on CUDA the allocator's allocated bytes, on the CPU the process's resident set."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    _reset_peak_rss()
    return _status_mb("VmRSS")


def peak_memory_mb(device: torch.device | str) -> float:
    """The most memory in use (MiB) on `device` since the last `reset_peak_memory`: on CUDA
    `torch.cuda.max_memory_allocated`, on the CPU the peak resident set (VmHWM) of the whole process."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_mb("VmHWM")


def dir_bytes(path: str | Path) -> int:
    """Bytes of the files directly in `path` (what a saved adapter or checkpoint costs on disk)."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor] | None = None,
                optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] = torch.optim.AdamW,
                ) -> dict[str, int]:
    """The bytes that training `model` holds besides activations, summed over the real tensors after one
    optimizer step on a copy (`model` itself is not touched):

        weights          every parameter and buffer, frozen or not (an NF4 base's codes and scales are buffers)
        trainable        the parameters that require grad: the part training changes
        gradients        one .grad per trainable parameter that the loss reaches, shaped and typed like it
        optimizer_state  what the optimizer keeps per trainable parameter; for AdamW the moments m and v
                         (two tensors like the parameter) and a 0-d fp32 step count per tensor

    So with fp32 AdamW, a trainable parameter costs 4 (weight) + 4 (gradient) + 8 (m, v) = 16 bytes and a
    frozen one 4. Worked example, the default base (1,299,520 parameters, fp32): full fine-tuning holds
    16 · 1.30M ≈ 20.8 MB; LoRA r=8 on every linear layer (81,920 trainable) holds 4 · 1.30M + 16 · 0.082M
    ≈ 6.5 MB, most of it the frozen weights, which is what QLoRA then shrinks (NF4: about 0.5 byte a weight).

    Measured rather than computed from that formula because the real tensors say what a formula forgets:
    AdamW's step counts, gradients only where the loss reaches, the optimizer's dtypes. `loss_fn(copy)`
    returns the scalar loss of one batch; without it, a surrogate Σ p over the trainable parameters gives
    every one of them a gradient (the sizes do not depend on the values).
    """
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    sizes = {"weights": _nbytes(model.parameters()) + _nbytes(model.buffers()), "trainable": _nbytes(params),
             "gradients": 0, "optimizer_state": 0}
    if not params:
        return sizes
    opt = optimizer(params)
    loss = loss_fn(model) if loss_fn is not None else sum(p.sum() for p in params)
    loss.backward()
    opt.step()
    sizes["gradients"] = _nbytes(p.grad for p in params if p.grad is not None)
    sizes["optimizer_state"] = _nbytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return sizes
