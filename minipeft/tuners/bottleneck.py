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
Other compositions (composition.py) are computed here too, from the block the PeftModel hands every layer as
`layer.composition`: Average (o + Σᵢ wᵢ·δᵢ(o)), Fuse (an AdapterFusion layer, fusion.py, kept per fusion name
in `adapter_fusion`) and a Stack holding a Fuse. Parallel is the PeftModel's forward pass (it replicates the
batch); a layer never computes it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minipeft.tuners.composition import AdapterCompositionBlock, Average, Fuse, Parallel, Stack
from minipeft.tuners.fusion import AdapterFusion
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

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """What the adapter adds: up(f(down(h))), without the residual (Average and Fuse combine these)."""
        z = ACTIVATIONS[self.non_linearity](self.adapter_down(h))  # (…, m)
        return self.adapter_up(z)  # (…, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(h)

    def extra_repr(self) -> str:
        return f"non_linearity={self.non_linearity!r}"


class BottleneckLayer(AdapterLayer):
    """A sublayer (block.attn or block.mlp) followed by its named bottleneck adapters, applied in order.

    forward(*args) = adapters(base_layer(*args)), combined as `composition` says (a Stack when None);
    `disabled` or no active adapter gives exactly base_layer(*args). Unknown attribute reads go to the base
    layer (see AdapterLayer). `adapter_fusion` holds this sublayer's AdapterFusion layers by fusion name ("a,b").
    """

    adapter_module_names = ("adapters",)

    def __init__(self, base_layer: nn.Module, d: int) -> None:
        super().__init__(base_layer)
        self.d = d
        self.adapters = nn.ModuleDict()
        self.adapter_fusion = nn.ModuleDict()

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

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop the adapter and every fusion layer that fuses it (a fusion without one of its inputs is meaningless)."""
        super().delete_adapter(adapter_name)
        for name in [f for f in self.adapter_fusion if adapter_name in f.split(",")]:
            del self.adapter_fusion[name]

    def add_fusion(self, fuse: Fuse, fusion_type: str, dropout: float) -> None:
        """An AdapterFusion layer over `fuse`'s adapters, which must all sit at this sublayer."""
        missing = [n for n in fuse.children if n not in self.adapters]
        if missing:
            raise ValueError(f"cannot fuse {missing} at this sublayer: no such adapter here")
        if fuse.name in self.adapter_fusion:
            raise ValueError(f"fusion {fuse.name!r} already exists in this layer")
        p = next(self.adapters[fuse.children[0]].parameters())
        self.adapter_fusion[fuse.name] = AdapterFusion(self.d, fusion_type, dropout, p.device, p.dtype)

    def fusion_parameters(self, fusion_name: str) -> dict[str, nn.Parameter]:
        """{"fusion_query.weight", "fusion_query.bias", "fusion_key.weight", "fusion_key.bias",
        "fusion_value.weight" (dynamic fusion only)}: no fusion name."""
        return dict(self.adapter_fusion[fusion_name].named_parameters())

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)  # (B, T, d)
        if self.row_route is not None:
            return self._forward_mixed(out)
        if self.disabled or not self.active_adapters:
            return out
        return self._compose(out, self.composition)

    def _forward_mixed(self, o: torch.Tensor) -> torch.Tensor:
        """A mixed-adapter batch (mixed_batch.py): row b gets its own adapter's δ(o[b]); each adapter runs on
        every row and is masked to its own (a bottleneck is cheap next to the sublayer), so its gradients come
        from its rows only."""
        names, index = self.row_route.for_layer(self.adapters)  # (B,) index into names, -1: none here
        out = o
        for i, name in enumerate(names):
            rows = (index == i).view(-1, *[1] * (o.dim() - 1))  # (B, 1, 1) bool
            out = torch.where(rows, out + self.adapters[name].delta(o), out)  # not rows·δ: 0·inf would be NaN
        return out

    def _compose(self, o: torch.Tensor, composition: AdapterCompositionBlock | None) -> torch.Tensor:
        """The active adapters applied to the sublayer output o (B, T, d) as `composition` says."""
        if isinstance(composition, Average):
            out = o  # o + Σᵢ wᵢ·δᵢ(o); an adapter that is not at this sublayer is the identity here (δᵢ = 0)
            for name, w in zip(composition.children, composition.weights, strict=True):
                if name in self.adapters:
                    out = out + w * self.adapters[name].delta(o)
            return out
        if isinstance(composition, Fuse):
            return self._fuse(o, composition)
        if isinstance(composition, Parallel):
            # ── Parallel hook ── PeftModel.forward replicates the batch once per child and routes each copy's
            # rows to its adapter with a per-row routing (`self.row_route`, read in forward before `_compose`).
            # A layer that meets a Parallel composition without a routing was called outside that path.
            raise ValueError(f"Parallel is handled by PeftModel.forward (the batch replicated once per adapter, "
                             f"each copy through one adapter), not by a layer; got {composition!r}")
        if isinstance(composition, Stack) and any(isinstance(c, Fuse) for c in composition.children):
            for child in composition.children:  # Stack("lang", Fuse("a", "b")): lang, then the fusion
                if isinstance(child, Fuse):
                    o = self._fuse(o, child)
                elif child in self.adapters:
                    o = self.adapters[child](o)
            return o
        for name in self.active_adapters:  # a Stack of names (or no composition): one after the other
            o = self.adapters[name](o)
        return o

    def _fuse(self, o: torch.Tensor, fuse: Fuse) -> torch.Tensor:
        if not any(n in self.adapters for n in fuse.children):
            return o  # none of the fused adapters sits at this sublayer
        deltas = torch.stack([self.adapters[n].delta(o) for n in fuse.children], dim=-2)  # (B, T, N, d)
        return self.adapter_fusion[fuse.name](o, deltas)


def adapter_sites(architecture: str) -> tuple[str, ...]:
    """The block sublayers that get an adapter: Houlsby ("attn", "mlp"), Pfeiffer ("mlp",)."""
    if architecture == "houlsby":
        return ("attn", "mlp")
    if architecture == "pfeiffer":
        return ("mlp",)
    raise ValueError(f"unknown adapter architecture {architecture!r}; expected 'pfeiffer' or 'houlsby'")
