"""Which layers a method touches: one target matcher for LoRA, the bottleneck adapters and quantization.

Every method that changes layers of a model asks the same question first — *which* layers? — and answers it
the way HF peft does: walk `model.named_modules()`, match each Linear's name against `target_modules`,
then replace the match on its parent (`setattr(parent, child, new)`). This module is that answer, written
once, below both `minipeft.tuners` and `minipeft.quant` so that each of them can use it:

    target_modules                 selects
    ["c_attn"]                     every Linear named `c_attn` or ending in ".c_attn" (each block's attention)
    ["transformer.h.0.attn.c_attn"] exactly that one
    "all-linear"                   every Linear except the output layer `lm_head`
    r".*\\.c_(attn|fc)"              a regular expression, matched against the *whole* name (re.fullmatch)

Names are the plain model's. An adapter wrapper (anything holding the layer it wraps as `base_layer`, as
peft's wrappers do) is transparent: `…attn.c_attn.base_layer` is still called `…attn.c_attn`, a LoRA-wrapped
Linear is found as that Linear, and the adapters' own small Linears (`lora_A`, `adapter_down`, …) are never
candidates. A target that matches nothing raises a ValueError listing the names that exist.

Tied weights. GPT-2's `lm_head` shares its weight with the token embedding. A method that *changes* a weight
(merging ΔW into it, quantizing it) would change the embedding too, or silently untie the two; so
`tied_parameter_ids` finds parameters reachable under more than one name, and the callers refuse or skip them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

import torch.nn as nn

__all__ = ["Target", "find_target_modules", "linear_modules", "named_layers", "set_submodule", "clean_name",
           "is_lm_head", "is_linear_like", "tied_parameter_ids", "ALL_LINEAR"]

ALL_LINEAR = "all-linear"


class Target(NamedTuple):
    """A layer that a method may replace: `name` in the plain model, `raw_name` in the model as it is now
    (with wrappers' `base_layer` segments), and the module itself."""

    name: str
    raw_name: str
    module: nn.Module


def is_linear_like(module: nn.Module) -> bool:
    """A layer with a Linear's contract: an nn.Linear, or a frozen quantized Linear (NF4Linear) that hands out
    its dense weight through `dequantize_weight(dtype)` and knows its `in_features` / `out_features`."""
    if isinstance(module, nn.Linear):
        return True
    return callable(getattr(module, "dequantize_weight", None)) and hasattr(module, "in_features") \
        and hasattr(module, "out_features")


def is_lm_head(name: str) -> bool:
    """The output projection: "all-linear" leaves it out (peft's rule: it is tied to the embedding in GPT-2
    and adapting the vocabulary projection is rarely what "all linear layers" means)."""
    return name == "lm_head" or name.endswith(".lm_head")


def clean_name(raw_name: str) -> str:
    """The module's name in the plain model: the wrappers' `base_layer` segments removed."""
    return ".".join(part for part in raw_name.split(".") if part != "base_layer")


def _wrapped(module: nn.Module) -> nn.Module | None:
    """The layer an adapter wrapper wraps (its `base_layer` child), or None for an ordinary module."""
    base = module._modules.get("base_layer")
    return base if isinstance(base, nn.Module) else None


def named_layers(model: nn.Module) -> list[Target]:
    """Every module of `model` under its plain-model name, in model order, adapter wrappers transparent.

    A wrapper stands for the layer it wraps (a LoraLinear is listed once, as the Linear it wraps, and a
    bottleneck wrapper around `attn` as `attn`); the adapters' own parts are left out, and inside a wrapper
    only the wrapped layer's children are walked. The walk never enters an adapter's parts, so its cost is
    the model's own size whatever the number of adapters (a mixed-adapter batch walks it once per call).
    """
    out: list[Target] = []
    seen: set[int] = set()  # as named_modules: a module reachable twice is listed once

    def walk(module: nn.Module, raw: str) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if raw:
            out.append(Target(clean_name(raw), raw, module))
        base = _wrapped(module)
        if base is not None:  # the wrapped layer itself is not listed (the wrapper stands for it): its children are
            seen.add(id(base))
            module, raw = base, f"{raw}.base_layer" if raw else "base_layer"
        for name, child in module._modules.items():
            if child is not None:
                walk(child, f"{raw}.{name}" if raw else name)

    walk(model, "")
    return out


def linear_modules(model: nn.Module) -> list[Target]:
    """The Linear-like layers of `named_layers(model)`: what LoRA and quantization can target."""
    return [t for t in named_layers(model) if is_linear_like(_wrapped(t.module) or t.module)]


def _available(names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    more = f", … ({len(names)} in all)" if len(names) > 8 else ""
    return f"leaf names {leaves}; full names {names[:8]}{more}"


def find_target_modules(
    model: nn.Module, target_modules: str | Sequence[str], candidates: list[Target] | None = None
) -> list[Target]:
    """The layers `target_modules` selects (see the module docstring), in model order.

    `candidates` are the layers to choose from: by default `linear_modules(model)` (LoRA, quantization);
    the bottleneck adapters choose among `named_layers(model)` (they wrap whole sublayers).

    Raises:
        ValueError: a name or regex that matches no Linear layer (the available names are listed), an
            invalid regex, or an empty list.
        TypeError: target_modules that is neither a string nor a sequence of strings.
    """
    linears = linear_modules(model) if candidates is None else candidates
    names = [t.name for t in linears]
    kind = "Linear layer" if candidates is None else "layer"
    if isinstance(target_modules, str):
        if target_modules == ALL_LINEAR:
            return [t for t in linears if not is_lm_head(t.name)]
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression: {e}") from e
        chosen = [t for t in linears if pattern.fullmatch(t.name)]
        if not chosen:
            raise ValueError(f"target_modules regex {target_modules!r} fully matches no {kind}; "
                             f"available: {_available(names)}")
        return chosen
    if not isinstance(target_modules, Sequence):
        raise TypeError(f"target_modules must be {ALL_LINEAR!r}, a regex string or a list of names, got "
                        f"{type(target_modules).__name__} {target_modules!r}")
    targets = list(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must be {ALL_LINEAR!r}, a regex string or a non-empty list of non-empty "
                         f"names, got {targets!r}")

    def hit(name: str, t: str) -> bool:
        return name == t or name.endswith("." + t)

    missing = [t for t in targets if not any(hit(n, t) for n in names)]
    if missing:
        raise ValueError(f"target_modules {missing} not found among the {kind}s; available: "
                         f"{_available(names)}")
    return [t for t in linears if any(hit(t.name, x) for x in targets)]


def set_submodule(root: nn.Module, raw_name: str, new: nn.Module) -> None:
    """Put `new` where `raw_name` is: `setattr(parent, child, new)` on the module's parent."""
    parent_name, _, child = raw_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def tied_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters reachable under more than one name (tied weights: lm_head ↔ token embedding)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}
