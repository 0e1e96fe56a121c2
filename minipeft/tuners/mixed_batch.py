"""Mixed-adapter batches: every row of a batch names its own adapter, and one batched pass computes them all.

A server that holds many fine-tuned adapters on one base gets requests for different adapters at once. Running
the batch once per adapter repeats the base model's work, which is almost all of it; instead each layer runs
the base once for every row and adds, row by row, what that row's adapter adds (punica's SGMV,
https://arxiv.org/abs/2310.18547; S-LoRA, https://arxiv.org/abs/2311.03285):

    LoRA         y[b] = x[b]·W₀ᵀ + s_a·(x[b]·A_aᵀ)·B_aᵀ,   a = the adapter of row b    (kernels.multi_lora_linear)
    bottleneck   o[b] ↦ o[b] + up_a(f(down_a(o[b])))        (each adapter on all rows, masked to its own)
    soft prompt  row b gets adapter a's n_a virtual tokens in front, left-padded to the longest prompt of
                 the batch; the padding is masked out of attention and out of the position count, so the row
                 sees exactly what it would see alone (GPT.forward's `prompt_mask`)

Each adapter's gradient comes from its own rows only, so a mixed batch trains several adapters in one step
exactly as separate batches of their rows would (the losses add up). A row named ``"__base__"`` (`BASE`)
gets the frozen model.

`RowRoute` is what `PeftModel.forward(..., adapter_names=[...])` hands to every adapter layer for the length
of one call (`layer.row_route`); `prompt_for_rows` builds the padded soft prompts. The small index tensors they
make from names are made once per distinct list and device and reused (`_constant`): a call then copies nothing
from the host, so a serving loop can capture a mixed batch's forward in a CUDA graph after warm-up calls (one
graph per batch composition: the adapters of the rows are part of what it recorded; `HELD_BY_GRAPHS`).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["BASE", "HELD_BY_GRAPHS", "RowRoute", "prompt_for_rows"]

BASE = "__base__"  # the row runs the base model, no adapter

_CONSTANTS: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_CONSTANTS_KEPT = 256  # distinct (values, dtype, device) kept, least recently used dropped first

# What a CUDA graph captured on a mixed batch reads. A graph keeps raw addresses, not references: a tensor it reads
# must outlive it, so what a capture uses (index tensors, packed adapters, their stack) is also held here, for the
# life of the process. A graph serves the adapters as they were when it was captured: capture again after
# changing or adding adapters.
HELD_BY_GRAPHS: list = []


def capturing(device: torch.device) -> bool:
    """True while a CUDA graph is being captured on ``device``'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _constant(values: tuple, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.tensor(values, dtype, device), made once and then reused; callers never write to it.

    A host-to-device copy cannot be recorded in a CUDA graph (it waits for the host), so a call that makes its
    index tensors afresh cannot be captured; one that finds them here copies nothing."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one key
        device = torch.device("cuda", torch.cuda.current_device())
    key = (values, dtype, device)
    t = _CONSTANTS.pop(key, None)  # popped and put back: now the most recently used
    if t is None:
        t = torch.tensor(values, dtype=dtype, device=device)
        if len(_CONSTANTS) >= _CONSTANTS_KEPT:
            _CONSTANTS.popitem(last=False)
    _CONSTANTS[key] = t
    if capturing(device):
        HELD_BY_GRAPHS.append(t)
    return t


@dataclasses.dataclass
class RowRoute:
    """Which adapter each row of the batch uses, for the length of one call (a forward, or a whole generate).

    names: the distinct adapter names of the batch, in order of first appearance (``"__base__"`` excluded).
    rows: (B,) int64 on the model's device, rows[b] = index into ``names``, or -1 for a ``"__base__"`` row.

    What every layer would otherwise recompute from the same rows (its index, the rows grouped by adapter for
    the kernels, its adapters packed together) is made once and kept for the call (`memo`): a 12-layer model
    with every Linear adapted asks 48 times per step, and a generate call asks again at every new token.
    """

    names: tuple[str, ...]
    rows: torch.Tensor
    _memo: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_names(cls, adapter_names: Sequence[str], device: torch.device) -> RowRoute:
        names = tuple(dict.fromkeys(n for n in adapter_names if n != BASE))
        position = {n: i for i, n in enumerate(names)}
        return cls(names, _constant(tuple(position.get(n, -1) for n in adapter_names), torch.long, device))

    def memo(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """make(), computed the first time ``key`` is asked for in this call and kept until the call ends."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def for_layer(self, layer_adapters: Mapping[str, Any]) -> tuple[list[str], torch.Tensor]:
        """(the batch's adapters this layer holds, in order; (B,) index into that list, -1 for the others).

        layer_adapters: the layer's adapters by name (its ModuleDict, or any mapping with ``keys()``)."""
        held = layer_adapters.keys()  # a dict view: a C-speed `in` (a ModuleDict's own `in` runs Python)
        local = [n for n in self.names if n in held]
        return local, self.memo(("index", tuple(local)), lambda: self._index(local))

    def _index(self, local: list[str]) -> torch.Tensor:
        table = tuple(local.index(n) if n in local else -1 for n in self.names) + (-1,)  # rows == -1 → the last
        return _constant(table, torch.long, self.rows.device)[self.rows]  # (B,)

    def row_mask(self, name: str) -> torch.Tensor:
        """(B,) bool: the rows that use adapter ``name``."""
        return self.rows == self.names.index(name)


def prompt_for_rows(prompts: Mapping[str, torch.Tensor], adapter_names: Sequence[str]
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
    """The soft prompts of a mixed batch, left-padded: (B, n_max, C) embeddings and a (B, n_max) bool mask.

    prompts: {adapter name: its (n_a, C) virtual tokens} for the soft-prompt adapters of the batch. Rows whose
    adapter is not among them get n_max padding positions (mask False). None when no row has a soft prompt.
    """
    if not prompts:
        return None
    n_max = max(p.shape[0] for p in prompts.values())
    any_prompt = next(iter(prompts.values()))
    empty = any_prompt.new_zeros(n_max, any_prompt.shape[1])
    embeds, mask = [], []
    for name in adapter_names:
        p = prompts.get(name)
        n = 0 if p is None else p.shape[0]
        embeds.append(empty if p is None else F.pad(p, (0, 0, n_max - n, 0)))  # (n_max, C), padding first
        mask.append((False,) * (n_max - n) + (True,) * n)
    return torch.stack(embeds), _constant(tuple(mask), torch.bool, any_prompt.device)
