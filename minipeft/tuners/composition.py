"""Composition blocks: how several adapters act together, with the `adapters` library's names and meanings.

A name or a list activates adapters one after the other; a block says how else they combine. The blocks are
those of AdapterHub's `adapters` library (https://docs.adapterhub.ml/adapter_composition.html), so that
`pm.set_active_adapters(Fuse("a", "b"))` reads the same to one of its users. At one adapted sublayer with
output o, where adapterᵢ(o) = o + δᵢ(o) and δᵢ(o) = upᵢ(f(downᵢ(o))) (bottleneck.py):

    Stack("a", "b")          b(a(o))                       one after the other (MAD-X); what a list means
    Average("a", "b", weights=[0.7, 0.3])
                             o + Σᵢ wᵢ·δᵢ(o)  = Σᵢ wᵢ·adapterᵢ(o) when Σᵢ wᵢ = 1   (output averaging)
    Fuse("a", "b")           o + Σᵢ pᵢ(o)·V·δᵢ(o)          AdapterFusion: a learned attention pᵢ over the
                                                           adapters, per token (fusion.py)
    Parallel("a", "b")       the batch replicated, copy i through adapter i (AdapterDrop's parallel
                             inference): B rows in, n·B rows out, handled by PeftModel.forward

An adapter that does not sit at a sublayer (a Pfeiffer adapter at an attention sublayer) is the identity
there: δᵢ = 0.

Average's weights, as the library's: None gives 1/n each; given weights are divided by their sum unless
`normalize_weights=False` (task arithmetic: `Average("a", "b", weights=[1, -1], normalize_weights=False)`
gives o + δ_a − δ_b). Weights that sum to 1 already (to 1e-12) are kept as given, so [0.7, 0.3] stays
[0.7, 0.3]. They must be finite, one per child, and a sum of 0 cannot be normalised (a ValueError).
minipeft computes o + Σᵢ wᵢ·δᵢ(o) whatever the weights: the sublayer output o is kept once. (The library's
bottleneck and LoRA layers compute `torch.mean(torch.stack(hᵢ) * wᵢ, 0)`, that is (1/n)·Σᵢ wᵢ·hᵢ with hᵢ
the adapters' full outputs; its documentation describes a weighted average, which is what minipeft computes.)

Nesting. The library allows Stack ⊃ {name, Fuse, Split, Parallel, BatchSplit, Average}, Fuse ⊃ {name,
Stack}, Parallel ⊃ {name, Stack, BatchSplit, Average}, Average ⊃ {name, Stack, Split, BatchSplit}.
minipeft supports a subset and refuses the rest with a ValueError when the block is built:

    Stack     names and Fuse blocks: Stack("lang", Fuse("a", "b")) runs lang, then the fusion of a and b
    Fuse      names (at least two; no "," in a name: a fusion is named "a,b", as in the library)
    Average   names
    Parallel  names

No adapter may appear twice in one composition. Blocks are immutable values: equal when their type,
children (and weights) are equal, hashable, with a repr that rebuilds them, and `to_dict()` /
`composition_from_dict()` give the JSON form that `save_pretrained` stores.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Union

__all__ = ["AdapterCompositionBlock", "Stack", "Parallel", "Average", "Fuse", "parse_composition",
           "composition_from_dict", "METHODS_SUPPORTING"]

Child = Union[str, "AdapterCompositionBlock"]


class AdapterCompositionBlock:
    """An immutable tuple of children: adapter names, or blocks where the nesting table allows."""

    __slots__ = ("children",)
    allowed_blocks: ClassVar[tuple[type, ...]] = ()  # the block types a child may be, besides an adapter name
    min_children: ClassVar[int] = 1

    def __init__(self, *children: Child) -> None:
        kind = type(self).__name__
        if len(children) == 1 and isinstance(children[0], (list, tuple)):
            raise TypeError(f"{kind} takes its children as arguments, {kind}('a', 'b'), not a list: got "
                            f"{kind}({list(children[0])!r})")
        if len(children) < self.min_children:
            raise ValueError(f"{kind} needs at least {self.min_children} adapter name"
                             f"{'s' if self.min_children > 1 else ''}, got {len(children)}")
        for child in children:
            if isinstance(child, AdapterCompositionBlock):
                if not isinstance(child, self.allowed_blocks):
                    allowed = ", ".join(["names", *(b.__name__ for b in self.allowed_blocks)])
                    raise ValueError(f"{kind} cannot hold {child!r}: minipeft nests Stack(names, Fuse(names)) and "
                                     f"nothing else; a {kind} holds {allowed}")
            elif not isinstance(child, str):
                raise TypeError(f"{kind} children must be adapter names (str) or composition blocks, got "
                                f"{child!r} ({type(child).__name__})")
            elif not child:
                raise ValueError(f"{kind} got an empty adapter name")
        object.__setattr__(self, "children", tuple(children))
        names = self.flatten()
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{kind} names adapter {twice[0]!r} twice: {self!r}; each adapter may appear once")

    # immutability: a block is a value (a dict key, a default argument), so nothing may change it
    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; build a new block instead")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __copy__(self) -> AdapterCompositionBlock:
        return self  # an immutable value: a copy may be the block itself

    def __deepcopy__(self, memo: dict) -> AdapterCompositionBlock:
        return self

    def __reduce__(self) -> tuple:
        return composition_from_dict, (self.to_dict(),)  # pickle rebuilds it through the JSON form

    def _key(self) -> tuple:
        return self.children

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._key() == self._key()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._key()))

    def _extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(c) for c in self.children)}{self._extra_repr()})"

    def __iter__(self) -> Iterator[Child]:
        return iter(self.children)

    def __len__(self) -> int:
        return len(self.children)

    def __getitem__(self, i: int) -> Child:
        return self.children[i]

    def flatten(self) -> list[str]:
        """Every adapter name, in order (the library returns a set; the order matters to `active_adapters`)."""
        return [n for c in self.children for n in ([c] if isinstance(c, str) else c.flatten())]

    def blocks(self) -> list[AdapterCompositionBlock]:
        """This block and every block nested in it, outermost first."""
        return [self, *(b for c in self.children if not isinstance(c, str) for b in c.blocks())]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: {"block": "Stack", "children": ["a", {"block": "Fuse", ...}]} (+ "weights" for Average)."""
        return {"block": type(self).__name__,
                "children": [c if isinstance(c, str) else c.to_dict() for c in self.children]}


class Stack(AdapterCompositionBlock):
    """Adapters one after the other: Stack("a", "b") computes b(a(o)) (MAD-X's language + task adapters)."""

    __slots__ = ()


class Fuse(AdapterCompositionBlock):
    """AdapterFusion over these adapters (fusion.py); needs `pm.add_adapter_fusion(Fuse(...))` first."""

    __slots__ = ()
    min_children = 2

    def __init__(self, *children: Child) -> None:
        super().__init__(*children)
        commas = [c for c in children if "," in c]
        if commas:
            raise ValueError(f"Fuse cannot hold adapter {commas[0]!r}: a fusion is named by its adapters joined with "
                             f"',' (the library's naming), so a fused adapter's name must not contain ','")

    @property
    def name(self) -> str:
        """The fusion's name, as the library's: the adapter names joined by "," ("a,b")."""
        return ",".join(self.children)


class Average(AdapterCompositionBlock):
    """Output averaging: o + Σᵢ wᵢ·δᵢ(o) (see the module docstring for the weights)."""

    __slots__ = ("weights",)

    def __init__(self, *children: Child, weights: Sequence[float] | None = None,
                 normalize_weights: bool = True) -> None:
        super().__init__(*children)
        n = len(children)
        if weights is None:
            values = [1.0 / n] * n
        else:
            if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
                raise TypeError(f"Average weights must be a list of numbers, got {weights!r}")
            if len(weights) != n:
                raise ValueError(f"Average weights has {len(weights)} entries for {n} adapters {list(children)}; "
                                 f"give one weight per adapter")
            for w in weights:
                if isinstance(w, bool) or not isinstance(w, numbers.Real):
                    raise TypeError(f"Average weights must be real numbers, got {w!r} ({type(w).__name__}) in "
                                    f"{list(weights)!r}")
                if not math.isfinite(w):
                    raise ValueError(f"Average weights must be finite, got {w!r} in {list(weights)!r}")
            values = [float(w) for w in weights]
            if not isinstance(normalize_weights, bool):
                raise TypeError(f"Average normalize_weights must be True or False, got {normalize_weights!r}")
            total = math.fsum(values)
            if normalize_weights and not _sums_to_one(values):  # weights that sum to 1 already stay as given
                if total == 0:
                    raise ValueError(f"Average weights {values} sum to 0, so they cannot be normalised to sum to 1; "
                                     f"pass normalize_weights=False to use them as they are")
                values = [w / total for w in values]
        object.__setattr__(self, "weights", tuple(values))

    def _key(self) -> tuple:
        return (self.children, self.weights)

    def _extra_repr(self) -> str:
        return f", weights={list(self.weights)!r}" + ("" if _sums_to_one(self.weights) else ", normalize_weights=False")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "weights": list(self.weights)}


def _sums_to_one(weights: Sequence[float]) -> bool:
    """Σ w = 1 up to rounding (1e-12), so that normalising normalised weights changes no bit."""
    return abs(math.fsum(weights) - 1.0) <= 1e-12


class Parallel(AdapterCompositionBlock):
    """The same input through each adapter: the batch is replicated once per child (PeftModel.forward)."""

    __slots__ = ()


Stack.allowed_blocks = (Fuse,)

BLOCKS: dict[str, type[AdapterCompositionBlock]] = {b.__name__: b for b in (Stack, Fuse, Average, Parallel)}

# Which adapter methods' layers compute a block. Stack works for every method (it is what a list always
# meant) and Parallel is the model's job (it replicates the batch), so neither is listed. A method's layer
# that learns a block adds its method name here.
METHODS_SUPPORTING: dict[type[AdapterCompositionBlock], tuple[str, ...]] = {
    Average: ("bottleneck", "lora"),
    Fuse: ("bottleneck",),
}


def parse_composition(setup: str | Sequence[str] | AdapterCompositionBlock) -> AdapterCompositionBlock:
    """A block for what `set_adapter` accepts: a name → Stack(name); a list or tuple of names → Stack(*names)
    (what a list has always meant); a block as it is."""
    if isinstance(setup, AdapterCompositionBlock):
        return setup
    if isinstance(setup, str):
        return Stack(setup)
    if isinstance(setup, (list, tuple)):
        if not setup:
            raise ValueError("set_adapter needs at least one adapter name (use disable_adapter() for the base)")
        return Stack(*setup)
    raise TypeError(f"expected an adapter name, a list of names or a composition block (Stack, Fuse, Average, "
                    f"Parallel), got {setup!r} ({type(setup).__name__})")


def composition_from_dict(d: Any) -> AdapterCompositionBlock:
    """The block that `to_dict()` gave; a ValueError naming what is wrong otherwise."""
    if not isinstance(d, dict) or not isinstance(d.get("children"), list):
        raise ValueError(f"a composition must be a dict with 'block' and a list of 'children', got {d!r}")
    kind = d.get("block")
    if kind not in BLOCKS:
        raise ValueError(f"unknown composition block {kind!r}; known: {list(BLOCKS)}")
    unknown = set(d) - {"block", "children", *(("weights",) if kind == "Average" else ())}
    if unknown:
        raise ValueError(f"composition block {kind} got unknown keys {sorted(unknown)}")
    children = [c if isinstance(c, str) else composition_from_dict(c) for c in d["children"]]
    try:
        if kind == "Average":  # the stored weights are the ones used: do not normalise them again
            return Average(*children, weights=d.get("weights"), normalize_weights=d.get("weights") is None)
        return BLOCKS[kind](*children)
    except TypeError as e:
        raise ValueError(f"invalid composition {d!r}: {e}") from e
