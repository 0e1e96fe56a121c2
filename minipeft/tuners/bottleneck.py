"""Bottleneck adapters: a small down → non-linearity → up network added to a sublayer's output.

Houlsby et al. insert a bottleneck of width m = d / reduction_factor after a transformer sublayer and
train only it; with the up-projection initialised to zero the adapter starts as the identity:

    adapter(o) = o + W_up · f(W_down · o + b_down) + b_up        W_down: (m, d), W_up: (d, m)

Trainable parameters per adapter: **2·d·m + m + d** (two weight matrices plus both biases), m = d // rf.
Worked example: d = 768, rf = 16 → m = 48: 2·768·48 + 48 + 768 = 74,544 per adapter.

Placement. Houlsby: one adapter after the attention sublayer and one after the FFN (2 per block).
Pfeiffer: one after the FFN only (1 per block); it matches Houlsby's quality at half the cost.
Houlsby: https://arxiv.org/abs/1902.00751; Pfeiffer: AdapterFusion https://arxiv.org/abs/2005.00247 and
AdapterHub https://arxiv.org/abs/2007.07779.

Where it sits in a pre-LN GPT. The papers used post-LN BERT, where a block computes
`h = LN(x + Adapter(Sublayer(x)))`: the adapter sees the sublayer's projected output, before the residual
add and before the LayerNorm. minipeft's GPT is pre-LN, `x = x + Sublayer(LN(x))`, and there is no
LayerNorm after the add. So the adapter wraps the sublayer (`block.attn`, `block.mlp`) and acts on its
output o before Block.forward adds it to the residual stream:

    x ──► LN₁ ──► Attn ──► o ──► [Houlsby adapter] ──► (+ x) ──► LN₂ ──► MLP ──► o' ──► [adapter] ──► (+)
                                                                                      (both methods)

That is the same spot relative to the residual add as in the paper, and the LayerNorm that followed the add
in BERT is, in a pre-LN model, the next sublayer's input LayerNorm (LN₂, or the next block's LN₁), so the
adapter's output is still normalised before anything reads it. Putting it after the add instead would put
it on the residual stream itself, where a non-identity init would disturb every later layer and an
identity one would change nothing the paper studied. The LayerNorms stay frozen (Houlsby also trained them;
we leave that out so that the adapter is the only trainable part and the counts above are exact).

The sublayer is wrapped, not edited: model.py never learns about adapters. Several adapters on one
sublayer run in the order of `active_adapters` (stacking: `set_adapter(["a", "b"])` applies a, then b).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minipeft.tuners.layer import AdapterLayer

__all__ = ["ACTIVATIONS", "BottleneckAdapter", "BottleneckLayer", "adapter_sites"]

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda t: F.gelu(t, approximate="tanh"),  # GPT-2's tanh form
    "swish": F.silu,
    "tanh": torch.tanh,
}


class BottleneckAdapter(nn.Module):
    """h ↦ h + up(f(down(h))): a residual bottleneck of width d // reduction_factor, identity at init.

    Args:
        d: the hidden size it reads and writes (the sublayer's output width, n_embd).
        reduction_factor: the bottleneck is d // reduction_factor wide (at least 1 is required).
        non_linearity: "relu", "gelu", "gelu_new", "swish" or "tanh".
    """

    def __init__(self, d: int, reduction_factor: int = 16, non_linearity: str = "relu",
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity must be one of {sorted(ACTIVATIONS)}, got {non_linearity!r}")
        if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, int) or reduction_factor <= 0:
            raise ValueError(f"reduction_factor must be a positive int, got {reduction_factor!r}")
        m = d // reduction_factor
        if m < 1:
            raise ValueError(f"reduction_factor={reduction_factor} leaves no bottleneck for hidden size {d} "
                             f"(d // reduction_factor = 0); use reduction_factor <= {d}")
        self.non_linearity = non_linearity
        self.adapter_down = nn.Linear(d, m, device=device, dtype=dtype)  # (m, d) + (m,)
        self.adapter_up = nn.Linear(m, d, device=device, dtype=dtype)  # (d, m) + (d,)
        # down: nn.Linear's Kaiming-uniform (a=√5), as LoRA's A, so the up-projection gets a gradient at
        # once; up: zeros, so that the adapter is exactly the identity when it is attached.
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = ACTIVATIONS[self.non_linearity](self.adapter_down(h))  # (…, m)
        return h + self.adapter_up(z)  # (…, d)

    def extra_repr(self) -> str:
        return f"non_linearity={self.non_linearity!r}"


class BottleneckLayer(AdapterLayer):
    """A sublayer (block.attn or block.mlp) followed by its named bottleneck adapters, applied in order.

    forward(*args) = adapters(base_layer(*args)); `disabled` or no active adapter gives exactly
    base_layer(*args). Unknown attribute reads go to the base layer (see AdapterLayer).
    """

    adapter_module_names = ("adapters",)

    def __init__(self, base_layer: nn.Module, d: int) -> None:
        super().__init__(base_layer)
        self.d = d
        self.adapters = nn.ModuleDict()

    def add_adapter(self, adapter_name: str, reduction_factor: int, non_linearity: str) -> None:
        if adapter_name in self.adapters:
            raise ValueError(f"adapter_name {adapter_name!r} already exists in this layer")
        p = next(self.base_layer.parameters(), None)
        device = p.device if p is not None else None
        dtype = p.dtype if p is not None and p.dtype.is_floating_point else None
        self.adapters[adapter_name] = BottleneckAdapter(self.d, reduction_factor, non_linearity, device, dtype)

    def adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """{"adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias"}: no adapter name."""
        return dict(self.adapters[adapter_name].named_parameters())

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)  # (B, T, d)
        if self.disabled:
            return out
        for name in self.active_adapters:
            out = self.adapters[name](out)
        return out


def adapter_sites(architecture: str) -> tuple[str, ...]:
    """The block sublayers that get an adapter: Houlsby ("attn", "mlp"), Pfeiffer ("mlp",)."""
    if architecture == "houlsby":
        return ("attn", "mlp")
    if architecture == "pfeiffer":
        return ("mlp",)
    raise ValueError(f"unknown adapter architecture {architecture!r}; expected 'pfeiffer' or 'houlsby'")
