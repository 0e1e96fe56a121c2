"""LoRA: freeze a Linear layer's weight W₀ and learn a low-rank update ΔW = (α/r)·B·A beside it.

A pretrained weight barely needs a full-rank change to adapt to a new task, so LoRA trains two thin
matrices instead of W₀ itself and adds their product to the frozen layer's output:

    h = W₀x + b + (α/r)·B·A·dropout(x)          A: (r, in), B: (out, r), r ≪ min(in, out)

With rsLoRA the scale is α/√r instead of α/r, which keeps the update's size stable as r grows.
LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685; rsLoRA: Kalajdzievski 2023,
https://arxiv.org/abs/2312.03732.

    x (…, in) ──────────────► [ W₀ (out, in), frozen ] ─────────────────► (+) ──► h (…, out)
        │                                                                  ▲
        └─► dropout ─► [ A (r, in) ] ─► (…, r) ─► [ B (out, r) ] ─► ×(α/r) ┘
                          Kaiming-uniform          zeros at init

Worked shapes: GPT-2 small's `c_attn` maps in=768 → out=2304 (q, k, v fused). With r=8, A is (8, 768),
B is (2304, 8): 8·(768 + 2304) = 24,576 trainable numbers instead of 768·2304 = 1,769,472 (1.4 %).
In general a LoRA adapter adds exactly **r·(in + out)** parameters per targeted Linear (no biases).

Because B starts at zero, a freshly attached adapter leaves the model's output exactly unchanged, while A's
random init gives B a useful gradient from the first step. `merge()` folds ΔW into W₀ so inference costs
nothing extra; `unmerge()` subtracts it again; `merge_and_unload()` returns a plain Linear. All three go
through the one `delta_weight(name)`.

The forward runs through `kernels.lora_linear` (the reference PyTorch ops on CPU, the fused Triton kernel
on CUDA); see `LoraLinear.forward` for how several active adapters share one call.
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from minipeft import kernels
from minipeft.checks import finite_real
from minipeft.targets import is_linear_like
from minipeft.tuners import mixed_batch
from minipeft.tuners.composition import Average
from minipeft.tuners.layer import AdapterLayer

__all__ = ["LoraLinear", "dense_weight", "combine_lora", "COMBINATION_TYPES"]


def dense_weight(base_layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The base layer's weight as a dense (out, in) tensor in `dtype` (default: its own dtype).

    nn.Linear: its `weight` (no copy when the dtype already matches). NF4Linear: the weight dequantized
    from its 4-bit codes, a fresh tensor each call (the codes themselves never change).
    """
    if isinstance(base_layer, nn.Linear):
        w = base_layer.weight
        return w if dtype is None or w.dtype == dtype else w.to(dtype)
    return base_layer.dequantize_weight(dtype)


def _weight_dtype(base_layer: nn.Module) -> torch.dtype:
    if isinstance(base_layer, nn.Linear):
        return base_layer.weight.dtype
    return getattr(base_layer, "weight_dtype", torch.float32)


def _weight_device(base_layer: nn.Module) -> torch.device:
    if isinstance(base_layer, nn.Linear):
        return base_layer.weight.device
    return base_layer.device  # a quantized layer (its codes' device, whether buffers or block parameters)


_VERSION = operator.attrgetter("_version")  # a tensor's version counter: +1 at every in-place change


class _MixedPlan(NamedTuple):
    """What a LoRA layer prepares once per mixed-batch call and row shape (`LoraLinear._mixed_plan`)."""

    packed: kernels.PackedAdapters  # this layer's adapters of the batch, packed
    index: torch.Tensor             # (B,) each sequence's adapter among them, -1 for none
    prepared: dict                  # the route's keyword: {"groups": …} (Triton kernels), {"gathered": …} or {}


class _Packing(NamedTuple):
    """A LoRA layer's adapters packed for mixed batches, and what they were packed from (`LoraLinear._packed`)."""

    state: tuple                # (names, dtype, scalings, the sum of the weights' version counters)
    weights: list[torch.Tensor]  # the A's, then the B's
    packed: kernels.PackedAdapters


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's when it is on for x's device (train.py runs bf16
    autocast on CUDA), else x's own. kernels.lora_linear wants every tensor in one dtype, so the layer casts."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class LoraLinear(AdapterLayer):
    """A frozen linear layer plus named LoRA adapters: h = base(x) + Σ_active (α/r)·B·A·dropout(x).

    Args:
        base_layer: the layer to wrap, kept as `self.base_layer` and never modified except by `merge()`:
            an nn.Linear or an NF4Linear (anything `is_linear_like`).

    Per adapter name: `lora_A[name]` (nn.Linear in→r, weight (r, in)), `lora_B[name]` (nn.Linear r→out,
    weight (out, r)), `scaling[name]`, `r[name]`, `lora_dropout[name]` (a probability). `active_adapters`
    lists the adapters this layer applies (the PeftModel keeps it in sync); `disabled` makes the layer
    compute exactly `base_layer(x)`.

    Attribute reads that the wrapper does not know (`weight`, `bias`, `in_features`, …) go to the base
    layer, so code written for the plain Linear keeps working (AdapterLayer).
    """

    adapter_module_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module) -> None:
        if not is_linear_like(base_layer):
            raise ValueError(f"LoraLinear wraps an nn.Linear or an NF4Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer)
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.merged_adapters: list[str] = []
        # Mixed-adapter batches without autograd: the adapters packed for the kernel, kept between calls
        # (`_packed`), or None.
        self._packed_cache: _Packing | None = None

    # ---- adapters -----------------------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
    ) -> None:
        """Create adapter `adapter_name` of rank r with scaling α/r (α/√r with rsLoRA), initialised as asked.

        The values come from a LoraConfig, which validated them when it was created."""
        if adapter_name in self.lora_A:
            raise ValueError(f"adapter_name {adapter_name!r} already exists in this layer")
        dtype, device = _weight_dtype(self.base_layer), _weight_device(self.base_layer)
        if not dtype.is_floating_point:
            dtype = torch.float32
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.r[adapter_name] = r
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout[adapter_name] = float(lora_dropout)
        self.reset_lora_parameters(adapter_name, init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str = True) -> None:
        """The LoRA paper's init (its code and torchtune's): A Kaiming-uniform with a=√5 (nn.Linear's own
        default), B zeros, so ΔW = 0 at the start. "gaussian": A ~ N(0, std=1/r) (peft's choice), B zeros.
        False: B random as well (Kaiming-uniform), so ΔW ≠ 0; useful only for tests of merging."""
        A, B = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        if init_lora_weights == "gaussian":
            nn.init.normal_(A, mean=0.0, std=1.0 / self.r[adapter_name])
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            nn.init.zeros_(B)

    def _apply(self, fn, *args, **kwargs):
        """nn.Module's hook for `.to()`, `.cuda()`, `.half()` …: they may give the adapters new storage under the
        same parameter objects, with no version change, so the kept mixed-batch packing is dropped first."""
        self._packed_cache = None
        return super()._apply(fn, *args, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (unmerging it first if it is merged)."""
        if adapter_name in self.merged_adapters:
            self.unmerge([adapter_name])
        super().delete_adapter(adapter_name)
        for d in (self.r, self.scaling, self.lora_dropout):
            d.pop(adapter_name)
        self._packed_cache = None  # let the deleted adapter's memory go

    def adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """The adapter's parameters by local name, without the adapter name: {"lora_A.weight", "lora_B.weight"}."""
        return {"lora_A.weight": self.lora_A[adapter_name].weight, "lora_B.weight": self.lora_B[adapter_name].weight}

    # ---- merging --------------------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW = scaling·B·A, shape (out, in), in the adapter's dtype. The one source for merge, unmerge,
        merge_and_unload and the tests."""
        A = self.lora_A[adapter_name].weight  # (r, in)
        B = self.lora_B[adapter_name].weight  # (out, r)
        return self.scaling[adapter_name] * (B @ A)  # (out, in)

    def _check_mergeable(self) -> None:
        if not isinstance(self.base_layer, nn.Linear):
            raise ValueError(
                f"merge() needs a dense base weight; this base is a {type(self.base_layer).__name__} (4-bit "
                "codes cannot absorb ΔW without re-quantizing it away). Use merge_and_unload(), which "
                "dequantizes and returns a dense nn.Linear."
            )

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None) -> None:
        """W ← W₀ + Σ ΔW for each adapter (default: the active ones) not merged yet.

        The merged weight is a new tensor: W₀ itself is kept aside untouched, so `unmerge()` gives back W₀
        bit for bit (subtracting ΔW again would leave float rounding behind). The price is one extra copy of
        this layer's weight while anything is merged; `merge_and_unload()`, the deployment path, keeps none.
        """
        self._check_mergeable()
        names = [n for n in (self.active_adapters if adapter_names is None else adapter_names)
                 if n not in self.merged_adapters]
        if not names:
            return
        w = self.base_layer.weight
        if not self.merged_adapters:
            # W₀, kept aside as a non-persistent buffer: it follows .to(device) and stays out of state_dict
            self.register_buffer("_unmerged_weight", w.data, persistent=False)
            w.data = w.data.clone()
        for name in names:
            w.data += self.delta_weight(name).to(w.dtype)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self, adapter_names: list[str] | None = None) -> None:
        """Take merged adapters (default: all) out of the weight again: W₀ exactly, plus what stays merged."""
        names = list(self.merged_adapters) if adapter_names is None else list(adapter_names)
        keep = [n for n in self.merged_adapters if n not in names]
        if len(keep) == len(self.merged_adapters):
            return
        w = self.base_layer.weight
        w.data = self._unmerged_weight
        del self._unmerged_weight
        self.merged_adapters = []
        self.merge(keep)

    @torch.no_grad()
    def merged_base_layer(self, adapter_names: list[str] | None = None) -> nn.Module:
        """A plain layer computing base(x) + Σ ΔW·x for the given adapters (default: active and merged):
        the base nn.Linear itself holding a new weight tensor W₀ + ΔW (W₀'s tensor is never written, so a
        weight tied to the token embedding, or held elsewhere, stays as it was; the new one is untied), or,
        for a quantized base, a new dense nn.Linear in the base's original dtype holding dequantize(W₀) + ΔW."""
        names = list(self.active_adapters) if adapter_names is None else list(adapter_names)
        names = [n for n in names if n not in self.merged_adapters]
        base = self.base_layer
        if isinstance(base, nn.Linear):
            if names:
                w = base.weight.detach().clone()
                for name in names:
                    w += self.delta_weight(name).to(w.dtype)
                base.weight = nn.Parameter(w, requires_grad=False)
            return base
        dtype = _weight_dtype(base)
        w = dense_weight(base, dtype)  # (out, in), dequantized
        for name in names:
            w += self.delta_weight(name).to(w.dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                           device=w.device, dtype=dtype)
        linear.weight = nn.Parameter(w, requires_grad=False)
        if base.bias is not None:
            linear.bias = nn.Parameter(base.bias.detach().clone().to(dtype), requires_grad=False)
        return linear

    # ---- forward --------------------------------------------------------------------------------------
    def _dropout_mask(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor | None:
        """Inverted dropout as a mask shaped like x (0 or 1/(1-p)), made here so every kernel backend sees
        the same mask; None in eval mode or when p = 0."""
        p = self.lora_dropout[adapter_name]
        if not self.training or p == 0.0:
            return None
        return torch.empty_like(x).bernoulli_(1.0 - p) / (1.0 - p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (…, in) → (…, out).

        The first active (unmerged) adapter goes through one `kernels.lora_linear` call together with the
        base weight and bias, which is the case the fused kernel is built for. Each further active adapter
        adds only its low-rank term s·B·A·dropout(x) (two thin matmuls): passing W₀ again would redo the
        big GEMM for nothing. Disabled, or with nothing left to apply, the layer is exactly base_layer(x).
        """
        if self.row_route is not None:
            return self._forward_mixed(x)
        pending = [n for n in self.active_adapters if n not in self.merged_adapters]
        if self.disabled:
            if self.merged_adapters:
                raise ValueError(
                    f"adapters {self.merged_adapters} are merged into the base weight, so it cannot be "
                    "disabled exactly; unmerge them first"
                )
            return self.base_layer(x)
        if not pending:
            return self.base_layer(x)
        dtype = _compute_dtype(x)
        x = x.to(dtype)
        scaling = self._scalings(pending)
        if isinstance(self.base_layer, nn.Linear):
            weight = self.base_layer.weight.to(dtype)  # (out, in), frozen
            bias = self.base_layer.bias
            bias = None if bias is None else bias.to(dtype)
            first, *rest = pending
            y = kernels.lora_linear(
                x, weight, bias,
                self.lora_A[first].weight.to(dtype), self.lora_B[first].weight.to(dtype),
                scaling[first], self._dropout_mask(first, x),
            )  # (…, out)
        elif hasattr(self.base_layer, "lora_forward"):
            # NF4 base: one call for the layer and the first adapter (kernels.nf4_lora_linear; fused on the
            # "triton" backend), which keeps the 4-bit codes for backward, never a dense weight.
            first, *rest = pending
            y = self.base_layer.lora_forward(
                x, self.lora_A[first].weight.to(dtype), self.lora_B[first].weight.to(dtype),
                scaling[first], self._dropout_mask(first, x),
            )  # (…, out)
        else:
            # Another quantized base (Int8Linear) runs its own autograd op, which keeps its packed codes for
            # backward; a dense weight passed to kernels.lora_linear would be kept instead, and the step would
            # hold every layer's 16-bit weight until backward. Every adapter then adds its low-rank term.
            y, rest = self.base_layer(x), pending  # (…, out)
        for name in rest:
            mask = self._dropout_mask(name, x)
            x_lora = x if mask is None else x * mask
            s = F.linear(x_lora, self.lora_A[name].weight.to(dtype))  # (…, r)
            y = y + scaling[name] * F.linear(s, self.lora_B[name].weight.to(dtype))  # (…, out)
        return y

    def _scalings(self, names: list[str]) -> dict[str, float]:
        """Each adapter's scaling α/r, times its weight wᵢ when the active composition is an Average
        (composition.py): y = W₀x + Σᵢ wᵢ·(α/r)ᵢ·BᵢAᵢx, the adapters' outputs averaged."""
        if isinstance(self.composition, Average):
            weight = dict(zip(self.composition.children, self.composition.weights, strict=True))
            return {n: weight[n] * self.scaling[n] for n in names}
        return {n: self.scaling[n] for n in names}

    def _forward_mixed(self, x: torch.Tensor) -> torch.Tensor:
        """A mixed-adapter batch (mixed_batch.py): row b of x (B, L, in) gets its own adapter's low-rank term,
        all rows in one `kernels.multi_lora_linear_packed` call; rows whose adapter this layer lacks get the base.

        What does not depend on x's values (this layer's adapters packed, the rows' index, and what the route
        prepares from it: the rows grouped, or each sequence's adapter gathered) is made once per call and row
        shape (`RowRoute.memo`), so a decode step looks it up: three launches per layer on the gathered route
        ("auto" on CUDA, inference), whatever the number of adapters."""
        dtype = _compute_dtype(x)
        plan = self.row_route.memo(("lora", id(self), dtype, x.shape[:-1]), lambda: self._mixed_plan(x, dtype))
        if plan is None:  # no row of the batch uses an adapter of this layer
            return self.base_layer(x)
        packed, index, prepared = plan
        bias = self.base_layer.bias
        return kernels.multi_lora_linear_packed(
            x.to(dtype), self.base_layer.weight.to(dtype), None if bias is None else bias.to(dtype), packed,
            index,  # (B,): one adapter per sequence
            check_index=False,  # made by RowRoute from names the PeftModel checked: no host sync per layer
            **prepared,  # the rows grouped (Triton kernels) or each sequence's adapter gathered (gathered route)
        )  # (B, L, out)

    def _mixed_plan(self, x: torch.Tensor, dtype: torch.dtype) -> _MixedPlan | None:
        """This layer's `_MixedPlan` for x's row shape; None when no row uses an adapter of this layer. Checks, once
        per call, that a mixed batch can run here."""
        names, batch_index = self.row_route.for_layer(self.lora_A)  # (B,) index into names, -1: none
        if not names:
            return None
        if self.merged_adapters:
            raise ValueError(f"adapters {self.merged_adapters} are merged into the base weight; unmerge them "
                             "before a mixed-adapter batch (every row would get them)")
        if not isinstance(self.base_layer, nn.Linear):
            raise ValueError(f"mixed-adapter batches need a 16-bit base layer (nn.Linear); this one is "
                             f"{type(self.base_layer).__name__}")
        if self.training and any(self.lora_dropout[n] > 0 for n in names):
            raise ValueError(f"mixed-adapter batches do not apply LoRA dropout, and adapters "
                             f"{[n for n in names if self.lora_dropout[n] > 0]} have lora_dropout > 0: train them "
                             "in batches of their own, or make them with lora_dropout=0")
        route, key, rows = self.row_route, tuple(names), x.shape[:-1]
        # Packed once per call (a generate: the prompt and every new token) and, without autograd, kept between
        # calls while the adapters do not change (`_packed`); the index and its grouping are shared by every
        # layer that holds the same adapters. The index is one per sequence (B,); only the segmented Triton
        # kernels need the rows grouped, per token.
        packed = route.memo(("lora packed", id(self), dtype), lambda: self._packed(names, dtype))
        if mixed_batch.capturing(x.device):  # a CUDA graph reads the packing at every replay: never free it
            mixed_batch.HELD_BY_GRAPHS.append(packed)
        bias = self.base_layer.bias
        kind = kernels.multi_lora_route(x.to(dtype), batch_index, packed, None if bias is None else bias.to(dtype))
        if kind == "gathered":  # each sequence's adapter copied once per call (a generate), whatever the shape
            return _MixedPlan(packed, batch_index, {"gathered": route.memo(
                ("lora gathered", id(self), dtype), lambda: kernels.gather_adapters(packed, batch_index))})
        if kind == "triton":  # the rows grouped by adapter, per token: once per call and row shape
            return _MixedPlan(packed, batch_index, {"groups": route.memo(("lora groups", key, rows), lambda: (
                kernels.group_rows(batch_index.view(-1, *[1] * (x.dim() - 2)).expand(rows), len(names))))})
        return _MixedPlan(packed, batch_index, {})  # the reference's loop finds each adapter's rows itself

    def _packed(self, names: list[str], dtype: torch.dtype) -> kernels.PackedAdapters:
        """The adapters ``names`` packed for `kernels.multi_lora_linear_packed`, in ``dtype``.

        With autograd recording, packed again on every call (the concatenation is what carries the gradients
        back to each adapter). Without it (inference, a server), the packing is kept and reused while it is
        still what packing would give: the same names, dtype and scalings, and the very same weight tensors,
        not modified in place since (their version counters) — an optimizer step or a `load_state_dict` make a
        new packing, and a `.to()` of the model or of this layer drops it (`_apply`). It costs one packed copy of
        the adapters. (Storage swapped under a parameter without passing through this layer — ``p.data = t``, or
        ``.to()`` on one adapter's own submodule — bumps no counter: call the layer's or the model's `.to()` after.)
        """
        # nn.Module's attribute lookup costs ~1 µs a call, and 64 adapters need 256 of them per layer: read the
        # same modules and parameters from the dicts behind it instead.
        a_modules, b_modules = self.lora_A._modules, self.lora_B._modules
        weights = [a_modules[n]._parameters["weight"] for n in names] + \
                  [b_modules[n]._parameters["weight"] for n in names]
        scalings = [self.scaling[n] for n in names]

        def pack() -> kernels.PackedAdapters:
            return kernels.pack_adapters([w.to(dtype) for w in weights[:len(names)]],
                                         [w.to(dtype) for w in weights[len(names):]], scalings)

        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            return pack()
        # map() runs these per-weight reads at C speed: this check is what each later call costs (~60 µs for 64
        # adapters on a 2-core CPU). Version counters only grow, so their sum changes exactly when one does.
        state = (names, dtype, scalings, sum(map(_VERSION, weights)))
        cached = self._packed_cache
        if cached is None or cached.state != state or not all(map(operator.is_, cached.weights, weights)):
            with torch.no_grad():
                self._packed_cache = cached = _Packing(state, weights, pack())
        return cached.packed

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.r[n]}" for n in self.adapter_names)
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{ranks}]"


COMBINATION_TYPES = ("cat", "linear")


@torch.no_grad()
def combine_lora(
    factors: list[tuple[torch.Tensor, torch.Tensor, float]], weights: list[float], combination_type: str = "cat"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's LoRA factors (A', B') that combine several adapters' (Aᵢ (rᵢ, in), Bᵢ (out, rᵢ), scaling sᵢ)
    with weights wᵢ; the combined adapter has scaling 1 (`PeftModel.add_weighted_adapter` uses this per layer).

    "cat": concatenate the ranks, A' = [A₁; A₂; …] (Σr, in), B' = [w₁s₁B₁, w₂s₂B₂, …] (out, Σr).
        B'A' = Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ, so ΔW' is *exactly* the weighted sum of the ΔWᵢ.
    "linear" (peft's): mix A and B separately, A' = Σᵢ cᵢAᵢ, B' = Σᵢ cᵢBᵢ with cᵢ = √(wᵢsᵢ).
        Needs equal ranks (A₁ and A₂ must be the same shape to be added), and then
        B'A' = Σᵢ cᵢ²BᵢAᵢ + Σᵢ≠ⱼ cᵢcⱼBᵢAⱼ: the weighted sum *plus cross terms* Bᵢ·Aⱼ that pair one
        adapter's down-projection with another's up-projection. The adapters' rank-r bases are unrelated,
        so those terms are noise unless the adapters share their A (or their B). It keeps rank r; "cat"
        is exact at rank Σr. (A negative wᵢsᵢ puts its sign on Aᵢ's coefficient only, so cᵢ² keeps it.)

    An adapter that does not touch the layer is passed as zeros of its rank: it adds nothing either way.
    """
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type must be one of {COMBINATION_TYPES}, got {combination_type!r}")
    for name, value in (("factors", factors), ("weights", weights)):
        if not isinstance(value, list | tuple):
            raise TypeError(f"{name} must be a list, one entry per adapter, got {type(value).__name__}")
    if not factors or len(weights) != len(factors):
        raise ValueError(f"factors and weights must hold one entry per adapter (at least one), got {len(factors)} "
                         f"factors and {len(weights)} weights")
    weights = [finite_real(w, f"weights[{i}]") for i, w in enumerate(weights)]
    if combination_type == "cat":
        A = torch.cat([a for a, _, _ in factors], dim=0)  # (Σr, in)
        B = torch.cat([(w * s) * b for (_, b, s), w in zip(factors, weights, strict=True)], dim=1)  # (out, Σr)
        return A, B
    if combination_type == "linear":
        A, B = torch.zeros_like(factors[0][0]), torch.zeros_like(factors[0][1])  # (r, in), (out, r)
        for (a, b, s), w in zip(factors, weights, strict=True):
            c = abs(w * s) ** 0.5
            A += (c if w * s >= 0 else -c) * a
            B += c * b
    return A, B
