"""AdapterLayer: what every layer method's wrapper shares (LoRA's `LoraLinear`, the bottleneck `BottleneckLayer`).

A layer method does not edit the model's modules; it replaces a module by a wrapper that keeps the original
as `base_layer` and holds the method's parameters per adapter name (peft's design):

    block.attn.c_attn  ──►  LoraLinear(base_layer=<the Linear>, lora_A={"default": …, "sentiment": …}, …)

The PeftModel tells each wrapper which of its adapters are active (in order) and whether adapters are
disabled; the wrapper computes `base_layer(x)` plus what its active adapters add. Everything else — the
adapter names, the active/disabled state, deleting an adapter, and attribute reads that fall through to
the wrapped layer (`layer.weight`, `layer.in_features`) — is the same for every method and lives here.
"""

from __future__ import annotations

import torch.nn as nn

from minipeft.tuners.composition import AdapterCompositionBlock
from minipeft.tuners.mixed_batch import RowRoute

__all__ = ["AdapterLayer"]


class AdapterLayer(nn.Module):
    """A wrapped layer plus named adapters.

    Subclasses keep each adapter's modules in `nn.ModuleDict`s keyed by adapter name and list those dicts'
    attribute names in `adapter_module_names` (the first one defines which adapters exist).

    Attributes:
        base_layer: the wrapped layer (frozen; only LoRA's `merge()` ever writes to it, on request).
        active_adapters: the adapters this layer applies, in order (kept in sync by the PeftModel).
        composition: how they combine: the PeftModel's whole active block (composition.py: Stack, Average,
            Fuse, Parallel; it may name adapters this layer does not hold), or None, which means a Stack of
            `active_adapters`.
        disabled: when True the layer computes exactly `base_layer(…)`.
        row_route: None, or for the length of one mixed-adapter call (`PeftModel.forward(adapter_names=…)`)
            which adapter each row of the batch uses (mixed_batch.RowRoute); it overrides `active_adapters`.
    """

    adapter_module_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.composition: AdapterCompositionBlock | None = None
        self.disabled = False
        self.row_route: RowRoute | None = None

    def __getattr__(self, name: str):
        """Attribute reads the wrapper does not know go to the wrapped layer, so code written for the plain
        layer keeps working (`layer.weight`, `block.attn.n_head`)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    @property
    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.adapter_module_names[0]).keys())

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop the adapter's modules and stop applying it."""
        for attr in self.adapter_module_names:
            del getattr(self, attr)[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]
