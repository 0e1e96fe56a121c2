"""One injection mechanism for every PEFT method, and PeftModel: named adapters on one frozen base.

Parameter-efficient fine-tuning freezes a pretrained model θ₀ and trains a small set of new parameters φ,
so that the fine-tuned model is f(x; θ₀, φ) with |φ| ≪ |θ₀| (survey: Lialin et al. 2023,
https://arxiv.org/abs/2303.15647). This module finds where φ goes and keeps track of it:

- "layer" methods put modules inside the model. LoRA wraps the targeted Linear layers (`LoraLinear`,
  lora.py); bottleneck adapters wrap each block's `attn` / `mlp` sublayer (`BottleneckLayer`,
  bottleneck.py). Both wrappers are `AdapterLayer`s (layer.py). Targets are found as peft does, by the one
  matcher in minipeft/targets.py: walk `named_modules()`, match a name, `get_submodule` the parent,
  `setattr` the wrapper, which keeps the original as `base_layer`.
- "input" methods (prompt tuning, P-tuning, prefix tuning) act on the model's input. Each is a module in
  `PeftModel.prompt_encoders` that follows the input-adapter protocol (input_adapter.py): its `prepare()`
  hands `GPT.forward` / `GPT.generate` virtual-token embeddings or a prefilled KV cache.

The base model is wrapped **in place**, as peft does: `get_peft_model(model, ...)` replaces modules inside
`model` itself and freezes its parameters (requires_grad=False); nothing is deep-copied, so a large model
never exists twice. Take `copy.deepcopy(model)` first if the plain model must stay untouched. Adding,
training, switching and deleting adapters never touches a base tensor; only `merge_adapter()` and
`merge_and_unload()` change base weights, by design.

Target matching (`target_modules`, LoRA; see minipeft/targets.py):
- a list of names: a Linear matches `t` if its name equals `t` or ends with "." + t
  (so "c_attn" finds every block's `attn.c_attn`, and "h.0.attn.c_attn" finds one);
- a string other than "all-linear": a regular expression that must match the whole name (re.fullmatch);
- "all-linear": every Linear except the output layer `lm_head`.
Names are the plain model's (a wrapper's `base_layer` segment is left out). A target that matches no Linear
raises a ValueError listing what is available.

Files: `save_adapter` / `save_pretrained` / `load_adapter` / `from_pretrained` gather or place the tensors
here and leave the file format (minipeft's or HF peft's) to io.py.

Combining adapters: `set_adapter` also takes a composition block (composition.py: Stack, Average, Fuse,
Parallel, the `adapters` library's). The PeftModel checks that it can be computed, keeps it as
`active_composition` (and its names, flat, as `active_adapters`) and hands it to every wrapper as
`layer.composition`; the wrappers compute it (bottleneck.py). AdapterFusion layers (fusion.py) live inside the
bottleneck wrappers, which are their one record; the PeftModel adds, activates, saves and loads them.

One PeftModel serves one caller at a time, as a torch module does: which adapters run (`set_adapter`,
`disable_adapter`, a mixed batch's per-row routes) is state held by the shared layers for the call, so two
threads calling one model with different adapters would see each other's choice. Serve threads from copies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from minipeft import quant
from minipeft.checkpoint import check_output_dir
from minipeft.checks import finite_real
from minipeft.targets import (
    find_target_modules,
    is_linear_like,
    named_layers,
    set_submodule,
    tied_parameter_ids,
)
from minipeft.tuners import io, mixed_batch, prefix, prompt
from minipeft.tuners.bottleneck import BottleneckLayer, adapter_sites
from minipeft.tuners.composition import (
    METHODS_SUPPORTING,
    AdapterCompositionBlock,
    Average,
    Fuse,
    Parallel,
    Stack,
    parse_composition,
)
from minipeft.tuners.config import (
    AdapterConfig,
    AdapterFusionConfig,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
)
from minipeft.tuners.layer import AdapterLayer
from minipeft.tuners.lora import COMBINATION_TYPES, LoraLinear, combine_lora

__all__ = ["PeftModel", "get_peft_model", "COMBINATION_TYPES"]

# How each input method builds its module (the input-adapter protocol): factory(config, model, tokenizer).
_INPUT_ADAPTERS: dict[type[PeftConfig], Callable[..., nn.Module]] = {
    PrefixTuningConfig: prefix.create_input_adapter,
    PromptTuningConfig: prompt.create_input_adapter,
    PTuningConfig: prompt.create_input_adapter,
}


class PeftModel(nn.Module):
    """A frozen GPT plus named adapters of any method; same forward/generate contract as GPT.

    Args:
        model: the base GPT; it is wrapped in place and its parameters are frozen.
        config: the first adapter's config (LoraConfig, AdapterConfig, PrefixTuningConfig, ...).
        adapter_name: its name (default "default"); it is added and made active.
        tokenizer: passed to input methods that need one at init (prompt tuning with TEXT init).

    Attributes: `base_model` (the GPT), `peft_config` {name: config}, `prompt_encoders` (input adapters).

    Adapters: `add_adapter` (added, not active), `set_adapter` (a name, a list or a composition block: only
    those are active and only their parameters require grad; layer adapters in a list stack in order, at most
    one input adapter), `train_adapter` / `set_active_adapters` (the `adapters` library's names) and
    `set_active_adapter` (the PEFT course notes' spelling) are the same call, `active_adapters` (flat),
    `active_composition` (the block), `disable_adapter()` (the base model exactly), `delete_adapter`,
    `add_weighted_adapter` (LoRA), `merge_adapter` / `unmerge_adapter` (LoRA, in place), `merge_and_unload`
    (LoRA: returns a plain GPT), `merge_and_requantize` (QLoRA), `unload`, `adapter_state_dict` /
    `load_adapter_state_dict`, `get_nb_trainable_parameters`, `print_trainable_parameters`; files:
    `save_adapter`, `save_pretrained`, `load_adapter`, `from_pretrained`.

    Combining adapters (composition.py, the `adapters` library's blocks): `set_adapter(Stack("a", "b"))`,
    `Average("a", "b", weights=[0.7, 0.3])`, `Fuse("a", "b")`, `Parallel("a", "b")`. AdapterFusion (fusion.py):
    `add_adapter_fusion(Fuse("a", "b"))`, `train_adapter_fusion` (only the fusion trains), `adapter_fusions`,
    `fusion_attention` (the attention of the last forward pass, per sublayer), `fusion_regularization_loss`,
    `delete_adapter_fusion`, `save_adapter_fusion` / `load_adapter_fusion`.

    Unknown attribute reads fall through to the base model (`pm.config`, `pm.device`, `pm.transformer`).
    """

    def __init__(self, model: nn.Module, config: PeftConfig, adapter_name: str = "default",
                 tokenizer: Any = None) -> None:
        super().__init__()
        if isinstance(model, PeftModel):
            raise ValueError("model is already a PeftModel; call add_adapter on it instead")
        if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
            raise ValueError(f"model must be a minipeft GPT (with a GPTConfig), got {type(model).__name__}")
        _check_not_wrapped(model)
        self.base_model = model
        model.__dict__[_WRAPPED_BY] = weakref.ref(self)  # one base, one wrapper (see _check_not_wrapped)
        self.peft_config: dict[str, PeftConfig] = {}
        self.prompt_encoders = nn.ModuleDict()
        self._active: list[str] = []
        self._merged: list[str] = []  # LoRA adapters folded into the base weights (a subset of _active)
        self._disabled = False
        requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            self.add_adapter(adapter_name, config, tokenizer=tokenizer)
            self.set_adapter(adapter_name)
        except BaseException:  # a refused first adapter leaves the model as it was, and free to wrap again
            model.__dict__.pop(_WRAPPED_BY, None)
            for name, p in model.named_parameters():
                p.requires_grad_(requires_grad[name])
            raise

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ------------------------------------------------------------------ adding and removing adapters
    def add_adapter(self, adapter_name: str, config: PeftConfig, tokenizer: Any = None) -> None:
        """Inject a new adapter `adapter_name` described by `config`; it is not activated (use set_adapter)."""
        self._check_new_name(adapter_name)
        if not isinstance(config, PeftConfig):
            raise ValueError(f"config must be a PeftConfig (LoraConfig, AdapterConfig, ...), got "
                             f"{type(config).__name__}")
        config = dataclasses.replace(config, base_model=self.base_model.config.to_dict())
        if isinstance(config, LoraConfig):
            self._inject_lora(adapter_name, config)
        elif isinstance(config, AdapterConfig):
            self._inject_bottleneck(adapter_name, config)
        elif type(config) in _INPUT_ADAPTERS:
            self.prompt_encoders[adapter_name] = self._create_input_adapter(config, tokenizer)
        else:
            raise ValueError(f"unknown PEFT method {config.method!r} for adapter {adapter_name!r}")
        self.peft_config[adapter_name] = config
        self._set_trainable()

    def _inject_lora(self, adapter_name: str, config: LoraConfig) -> None:
        targets = find_target_modules(self.base_model, config.target_modules)
        for name, _raw, module in targets:
            rank = min(module.in_features, module.out_features)
            if config.r > rank:  # a larger rank adds parameters but no expressiveness, and can exhaust memory
                raise ValueError(f"LoraConfig.r={config.r} exceeds the rank a LoRA update of {name} can have: "
                                 f"min(in_features, out_features) = min({module.in_features}, "
                                 f"{module.out_features}) = {rank}")
        for _name, raw, module in targets:
            if not isinstance(module, LoraLinear):
                module = LoraLinear(module)
                set_submodule(self.base_model, raw, module)
            module.add_adapter(adapter_name, config.r, config.lora_alpha, config.lora_dropout,
                               config.init_lora_weights, config.use_rslora)

    def _inject_bottleneck(self, adapter_name: str, config: AdapterConfig) -> None:
        d = self.base_model.config.n_embd
        if d // config.reduction_factor < 1:
            raise ValueError(f"AdapterConfig.reduction_factor={config.reduction_factor} leaves no bottleneck "
                             f"for n_embd={d}; use reduction_factor <= {d}")
        sites = find_target_modules(self.base_model, list(adapter_sites(config.architecture)),
                                    candidates=named_layers(self.base_model))  # every block's attn / mlp
        for _name, raw, layer in sites:
            if not isinstance(layer, BottleneckLayer):
                layer = BottleneckLayer(layer, d)
                set_submodule(self.base_model, raw, layer)
            layer.add_adapter(adapter_name, config.reduction_factor, config.non_linearity)

    def _create_input_adapter(self, config: PeftConfig, tokenizer: Any) -> nn.Module:
        n = config.num_virtual_tokens
        self.base_model.check_length(n + 1, detail=f"{n} virtual tokens + at least 1 real token")
        tokenizer = tokenizer if tokenizer is not None else getattr(config, "tokenizer", None)
        return _INPUT_ADAPTERS[type(config)](config, self.base_model, tokenizer)

    def _check_new_name(self, adapter_name: str) -> None:
        """A name for a new adapter: a non-empty string, no '.' (it becomes a module key), not taken, and not
        the mixed-batch marker for rows that run the bare base."""
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
        if adapter_name == mixed_batch.BASE:
            raise ValueError(f"adapter_name {adapter_name!r} is reserved: in a mixed batch it names the rows that "
                             "run the base model without an adapter")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter_name {adapter_name!r} already exists; existing adapters: "
                             f"{list(self.peft_config)}. Delete it first or pick another name")

    def _check_name(self, adapter_name: str) -> None:
        if not isinstance(adapter_name, str):
            raise TypeError(f"adapter_name must be a str, got {type(adapter_name).__name__} {adapter_name!r}")
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; existing adapters: {list(self.peft_config)}")

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; a wrapper left with no adapter is replaced by its base layer."""
        self._check_name(adapter_name)
        if adapter_name in self._merged:
            self._unmerge_first(f"delete_adapter({adapter_name!r})")
        for _clean, raw, layer in self._wrappers():
            if adapter_name in layer.adapter_names:
                layer.delete_adapter(adapter_name)
                if not layer.adapter_names:
                    set_submodule(self.base_model, raw, layer.base_layer)
        if adapter_name in self.prompt_encoders:
            del self.prompt_encoders[adapter_name]
        del self.peft_config[adapter_name]
        self._active = [a for a in self._active if a != adapter_name]
        self._sync_layers()
        self._set_trainable()

    # ------------------------------------------------------------------ which adapters are active
    # The active composition block (composition.py), as set_adapter got it; `_active` is its flat list of names.
    _composition: AdapterCompositionBlock | None = None

    @property
    def active_adapters(self) -> list[str]:
        """Every adapter the active composition uses, flattened, in order (Stack("a", Fuse("b", "c")) → a, b, c)."""
        return list(self._active)

    @property
    def active_composition(self) -> AdapterCompositionBlock | None:
        """The active composition block: a Stack for a name or a list, the block given to set_adapter, None when
        nothing is active."""
        if not self._active:
            return None
        return self._composition if self._composition is not None else Stack(*self._active)

    @property
    def active_adapter(self) -> str | list[str]:
        """peft's singular spelling: the name when one adapter is active, else the list."""
        return self._active[0] if len(self._active) == 1 else list(self._active)

    def set_adapter(self, adapter_name: str | Sequence[str] | AdapterCompositionBlock) -> None:
        """Make exactly these adapters active (and trainable): a name, a list (a Stack: layer adapters apply in
        its order) or a composition block (composition.py: Stack, Average, Fuse, Parallel). With a Fuse in the
        composition only fusion layers train: every adapter stays frozen (AdapterFusion's second stage).
        Merged adapters are unmerged first (with a warning): what is merged always equals what is active.

        Raises:
            ValueError: an unknown adapter; a Fuse whose fusion was not added (add_adapter_fusion); an Average or
                Fuse of input adapters, of adapters of different methods or of a method whose layers do not
                compute it (composition.METHODS_SUPPORTING); two input adapters in a Stack; nesting that
                minipeft does not support (raised when the block is built).
        """
        composition = parse_composition(adapter_name)
        self._check_composition(composition)
        names = composition.flatten()
        if names != self._active or composition != self._composition:
            self._unmerge_first(f"set_adapter({adapter_name!r})")
        self._active, self._composition = names, composition
        self._sync_layers()
        self._set_trainable()

    def _check_composition(self, composition: AdapterCompositionBlock) -> None:
        """ValueError unless this model can compute `composition` (see set_adapter)."""
        names = composition.flatten()
        for n in names:
            self._check_name(n)
        inputs = [n for n in names if self.peft_config[n].kind == "input"]
        if isinstance(composition, Stack) and len(inputs) > 1:
            raise ValueError(f"only one input adapter (prompt/prefix/P-tuning) can be active at a time, got {inputs}")
        for block in composition.blocks():
            kind = type(block).__name__
            methods = {n: self.peft_config[n].method for n in block.children if isinstance(n, str)}
            if isinstance(block, (Average, Fuse)):
                inputs = [n for n in methods if self.peft_config[n].kind == "input"]
                if inputs:
                    hint = f"; Stack({inputs[0]!r}, Fuse(...)) runs it before a fusion" if kind == "Fuse" else ""
                    raise ValueError(f"{kind} combines the outputs of layer adapters; {inputs[0]!r} is an input "
                                     f"adapter ({methods[inputs[0]]}), which acts on the model's input{hint}")
                if len(set(methods.values())) > 1:
                    raise ValueError(f"{kind} needs adapters of one method, got {methods}")
                unsupported = {n: m for n, m in methods.items() if m not in METHODS_SUPPORTING[type(block)]}
                if unsupported:
                    raise ValueError(f"{kind} is computed by the layers of {METHODS_SUPPORTING[type(block)]} "
                                     f"adapters only; got {unsupported}")
            if isinstance(block, Fuse) and block.name not in self.adapter_fusions:
                raise ValueError(f"{block!r} has no fusion layer: add it first with add_adapter_fusion({block!r}) "
                                 f"(or load_adapter_fusion); fusions: {self.adapter_fusions}")

    def _deactivate_all(self) -> None:
        """No adapter active (what a saved model with nothing active restores to)."""
        self._unmerge_first("deactivating every adapter")
        self._active, self._composition = [], None
        self._sync_layers()
        self._set_trainable()

    def train_adapter(self, adapter_name: str | Sequence[str] | AdapterCompositionBlock) -> None:
        """The `adapters` library's name: activate these adapters and make only them trainable."""
        self.set_adapter(adapter_name)

    def set_active_adapters(self, adapter_name: str | Sequence[str] | AdapterCompositionBlock) -> None:
        """The `adapters` library's name for set_adapter."""
        self.set_adapter(adapter_name)

    def set_active_adapter(self, adapter_name: str | Sequence[str] | AdapterCompositionBlock) -> None:
        """The PEFT course notes' spelling of set_adapter."""
        self.set_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model computes exactly the base model (no layer or input adapter runs); merged
        adapters are unmerged first (with a warning), since the base cannot be computed exactly otherwise."""
        self._unmerge_first("disable_adapter()")
        previous = self._disabled
        self._disabled = True
        self._sync_layers()
        try:
            yield
        finally:
            self._disabled = previous
            self._sync_layers()

    def _wrappers(self) -> list[tuple[str, str, AdapterLayer]]:
        """(name, raw name, wrapper) of every adapter wrapper in the base model."""
        return [t for t in named_layers(self.base_model) if isinstance(t.module, AdapterLayer)]

    def _sync_layers(self) -> None:
        """Tell every wrapper what is active: its own adapters in order, the whole composition, disabled or not."""
        self._drop_what_is_gone()
        composition = self.active_composition
        for _c, _r, layer in self._wrappers():
            layer.active_adapters = [n for n in self._active if n in layer.adapter_names]
            layer.composition = composition
            layer.disabled = self._disabled

    def _drop_what_is_gone(self) -> None:
        """After delete_adapter / delete_adapter_fusion: a Stack loses the deleted names (as a list always did);
        any other composition that used what was deleted is no longer active (with a warning)."""
        composition, fusions = self._composition, set(self.adapter_fusions)

        def exists(child: str | AdapterCompositionBlock) -> bool:
            if isinstance(child, str):
                return child in self.peft_config
            return all(exists(c) for c in child) and (not isinstance(child, Fuse) or child.name in fusions)

        if composition is None or exists(composition):
            return
        kept = [c for c in composition if exists(c)] if isinstance(composition, Stack) else []
        self._composition = Stack(*kept) if kept else None
        if not isinstance(composition, Stack) or any(not isinstance(c, str) and not exists(c) for c in composition):
            warnings.warn(f"{composition!r} used a deleted adapter or fusion; active now: {self._composition!r}",
                          stacklevel=4)
        self._active = self._composition.flatten() if kept else []

    def _set_trainable(self) -> None:
        """Only the active adapters' parameters require grad; the base never does. A composition with a Fuse
        trains only its fusion layers: every adapter in it stays frozen (AdapterFusion's second stage)."""
        composition = self.active_composition
        fuses = [] if composition is None else [b.name for b in composition.blocks() if isinstance(b, Fuse)]
        trainable = set() if fuses else set(self._active)
        for name in self.peft_config:
            for p in self._adapter_parameters(name).values():
                p.requires_grad_(name in trainable)
        for fusion in self.adapter_fusions:
            for p in self._fusion_parameters(fusion).values():
                p.requires_grad_(fusion in fuses)

    def _input_adapter(self) -> nn.Module | None:
        if self._disabled:
            return None
        for n in self._active:
            if n in self.prompt_encoders:
                return self.prompt_encoders[n]
        return None

    @property
    def num_virtual_tokens(self) -> int:
        """Positions the active input adapter (prompt or prefix) takes from block_size; 0 without one."""
        encoder = self._input_adapter()
        return 0 if encoder is None else encoder.num_virtual_tokens

    def nearest_tokens(self, k: int = 5, tokenizer: Any = None) -> list:
        """For each virtual token of the active soft prompt, the k vocabulary tokens nearest by cosine.

        The prompt-tuning notes: learned soft prompts are not words, but "analyzing the nearest neighbor tokens
        can provide insights". Returns one list per virtual token of `Neighbor(token_id, token, cosine)`, best first.
        """
        encoder = self._input_adapter()
        if encoder is None or not hasattr(encoder, "nearest_tokens"):
            raise ValueError("nearest_tokens needs an active prompt-tuning or P-tuning adapter (a prefix lives in "
                             f"key/value space, not in the embedding space); active: {self._active}")
        return encoder.nearest_tokens(self.base_model.transformer.wte.weight, k, tokenizer)

    # ------------------------------------------------------------------ AdapterFusion (fusion.py)
    def _bottleneck_layers(self) -> list[tuple[str, str, BottleneckLayer]]:
        return [w for w in self._wrappers() if isinstance(w[2], BottleneckLayer)]

    @property
    def adapter_fusions(self) -> list[str]:
        """The names of the fusion layers added ("a,b": the fused adapters joined by ","), oldest first."""
        names: list[str] = []
        for _c, _r, layer in self._bottleneck_layers():
            names += [n for n in layer.adapter_fusion if n not in names]
        return names

    def _check_fusion(self, fuse: Fuse) -> None:
        if fuse.name not in self.adapter_fusions:
            raise ValueError(f"fusion {fuse.name!r} does not exist; fusions: {self.adapter_fusions}")

    def add_adapter_fusion(self, adapter_names: Fuse | Sequence[str] | str, config: str = "dynamic",
                           dropout_prob: float | None = None) -> None:
        """Add an AdapterFusion layer over these bottleneck adapters at every sublayer they adapt; it is not
        activated and starts frozen (`train_adapter_fusion(Fuse(...))` or `set_active_adapters(Fuse(...))` turn it
        on, with only the fusion trainable). The `adapters` library's call.

        Args:
            adapter_names: Fuse("a", "b"), a list of names or "a,b"; at least two bottleneck adapters of one
                architecture (they must sit at the same sublayers).
            config: "dynamic" (query, key and value matrices; the library's default) or "static" (no value).
            dropout_prob: dropout on the attention scores; None: the base's GPTConfig.dropout (the library
                takes the base's attention dropout).
        """
        fuse = _as_fuse(adapter_names)
        for n in fuse.children:
            self._check_name(n)
        others = {n: self.peft_config[n].method for n in fuse.children if not isinstance(self.peft_config[n],
                                                                                           AdapterConfig)}
        if others:
            raise ValueError(f"add_adapter_fusion fuses bottleneck adapters only; got {others}")
        if fuse.name in self.adapter_fusions:
            raise ValueError(f"fusion {fuse.name!r} already exists; delete_adapter_fusion({fuse!r}) first")
        architectures = {n: self.peft_config[n].architecture for n in fuse.children}
        if len(set(architectures.values())) > 1:
            raise ValueError(f"add_adapter_fusion needs adapters at the same sublayers, that is of one architecture; "
                             f"got {architectures}")
        fusion = AdapterFusionConfig(list(fuse.children), config,
                                     self.base_model.config.dropout if dropout_prob is None else dropout_prob)
        for _c, _r, layer in self._bottleneck_layers():
            if fuse.children[0] in layer.adapter_names:
                layer.add_fusion(fuse, fusion.fusion_type, fusion.dropout_prob)
        self._set_trainable()

    def train_adapter_fusion(self, adapter_setup: Fuse | Sequence[str] | AdapterCompositionBlock) -> None:
        """The `adapters` library's call for AdapterFusion's second stage: activate the fusion (a Fuse, the fused
        names as a list, or a Stack holding a Fuse) with only its fusion layers trainable."""
        setup = adapter_setup if isinstance(adapter_setup, AdapterCompositionBlock) else _as_fuse(adapter_setup)
        if not any(isinstance(b, Fuse) for b in setup.blocks()):
            raise ValueError(f"train_adapter_fusion needs a Fuse (or a Stack holding one), got {setup!r}; to train "
                             f"adapters use train_adapter")
        self.set_adapter(setup)

    def delete_adapter_fusion(self, adapter_names: Fuse | Sequence[str] | str) -> None:
        """Remove a fusion layer everywhere; an active composition that uses it is no longer active (a warning)."""
        fuse = _as_fuse(adapter_names)
        self._check_fusion(fuse)
        for _c, _r, layer in self._bottleneck_layers():
            if fuse.name in layer.adapter_fusion:
                del layer.adapter_fusion[fuse.name]
        self._sync_layers()
        self._set_trainable()

    def _fusion_parameters(self, fusion_name: str) -> dict[str, nn.Parameter]:
        """A fusion's parameters by the plain base model's module names: transformer.h.0.mlp.fusion_query.weight, …"""
        return {f"{clean}.{k}": p for clean, _r, layer in self._bottleneck_layers()
                if fusion_name in layer.adapter_fusion for k, p in layer.fusion_parameters(fusion_name).items()}

    def _fusion_config(self, fusion_name: str) -> AdapterFusionConfig:
        """The config a fusion was made with, read off its modules (they are the one record of it)."""
        module = next(layer.adapter_fusion[fusion_name] for _c, _r, layer in self._bottleneck_layers()
                      if fusion_name in layer.adapter_fusion)
        return AdapterFusionConfig(fusion_name.split(","), module.fusion_type, module.fusion_dropout.p,
                                   self.base_model.config.to_dict())

    def _active_fuse(self, adapter_names: Fuse | Sequence[str] | str | None, what: str) -> Fuse:
        if adapter_names is not None:
            fuse = _as_fuse(adapter_names)
        else:
            composition = self.active_composition
            fuses = [] if composition is None else [b for b in composition.blocks() if isinstance(b, Fuse)]
            if len(fuses) != 1:
                raise ValueError(f"{what}: name the fusion (Fuse('a', 'b')); the active composition {composition!r} "
                                 f"holds {len(fuses)} Fuse blocks")
            fuse = fuses[0]
        self._check_fusion(fuse)
        return fuse

    def fusion_attention(self, adapter_names: Fuse | Sequence[str] | str | None = None,
                         average: bool = False) -> dict[str, torch.Tensor]:
        """The attention weights p of a fusion in the last forward pass that ran it, per fused sublayer:
        {"transformer.h.0.mlp": tensor (B, T, N)}, p[b, t, i] the weight of the Fuse's i-th adapter at token t
        (each row sums to 1). `average=True` gives the mean over batch and positions instead, (N,) per sublayer
        (padding positions included: pass an unpadded batch, or mask the raw tensors yourself). The default
        fusion is the one in the active composition. The paper's plots are these averages, layer by layer."""
        if not isinstance(average, bool):  # "no" would be truthy
            raise TypeError(f"average must be True or False, got {type(average).__name__} {average!r}")
        fuse = self._active_fuse(adapter_names, "fusion_attention")
        out = {}
        for clean, _r, layer in self._bottleneck_layers():
            attention = layer.adapter_fusion[fuse.name].last_attention if fuse.name in layer.adapter_fusion else None
            if attention is not None:
                out[clean] = attention.mean(dim=(0, 1)) if average else attention
        if not out:
            raise ValueError(f"fusion {fuse.name!r} has not run yet: activate it (set_active_adapters({fuse!r})) and "
                             f"run a forward pass first")
        return out

    def fusion_regularization_loss(self, adapter_names: Fuse | Sequence[str] | str | None = None,
                                   weight: float = 0.01) -> torch.Tensor:
        """The library's regulariser of dynamic AdapterFusion, weight·Σ‖W_V − I‖²_F over the fusion's layers
        (weight 0.01 as there; default fusion: the active one). Add it to the loss while training the fusion; it
        keeps the value matrices near the identity they start from. 0 for a static fusion (no W_V)."""
        weight = finite_real(weight, "weight")
        fuse = self._active_fuse(adapter_names, "fusion_regularization_loss")
        params = self._fusion_parameters(fuse.name)
        values = [p for k, p in params.items() if k.endswith("fusion_value.weight")]
        if not values:
            return next(iter(params.values())).new_zeros(())
        eye = torch.eye(values[0].shape[0], device=values[0].device, dtype=values[0].dtype)
        return weight * sum((v - eye).pow(2).sum() for v in values)

    def save_adapter_fusion(self, directory: str | Path, adapter_names: Fuse | Sequence[str] | str) -> None:
        """Write a fusion layer's tensors and config (the fused adapters' names, its type, its dropout, the base
        fingerprint) to `directory`: adapter_fusion.safetensors, adapter_fusion_config.json and a manifest, each
        atomically (io.write_fusion). The fused adapters are not written: save them with save_adapter."""
        fuse = _as_fuse(adapter_names)
        self._check_fusion(fuse)
        tensors = {k: p.detach() for k, p in self._fusion_parameters(fuse.name).items()}
        _check_finite_to_save(tensors, f"fusion {fuse.name}")
        io.write_fusion(directory, self._fusion_config(fuse.name), tensors)

    def load_adapter_fusion(self, directory: str | Path, set_active: bool = False) -> Fuse:
        """Add the fusion layer saved in `directory` (save_adapter_fusion) over adapters already in this model,
        not activated unless `set_active`; returns its Fuse. A failed load leaves the model as it was.

        Raises:
            ValueError: an unreadable or foreign file (io.read_fusion), a fused adapter this model does not hold,
                an existing fusion of the same adapters, or a missing / unexpected / mis-shaped tensor (named).
        """
        config, tensors, source = io.read_fusion(directory, self.base_model.config.to_dict())
        fuse = Fuse(*config.adapter_names)
        try:
            with _rng_untouched(self.base_model):
                self.add_adapter_fusion(fuse, config.fusion_type, config.dropout_prob)
        except ValueError as e:
            raise ValueError(f"{Path(directory) / io.FUSION_CONFIG_NAME}: cannot add the fusion of "
                             f"{list(fuse.children)}: {e}") from e
        try:
            expected = self._fusion_parameters(fuse.name)
            try:
                _check_tensors(expected, tensors, f"fusion {fuse.name!r}")
            except ValueError as e:
                raise ValueError(f"{source}: {e}") from e
            with torch.no_grad():
                for key, value in tensors.items():
                    expected[key].copy_(value.to(device=expected[key].device, dtype=expected[key].dtype))
        except BaseException:
            self.delete_adapter_fusion(fuse)  # nothing half-loaded is left behind
            raise
        if set_active:
            self.set_adapter(fuse)
        return fuse

    # ------------------------------------------------------------------ adapter tensors
    def _adapter_parameters(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """Parameters of one adapter keyed as in `adapter_state_dict`."""
        out: dict[str, nn.Parameter] = {}
        for clean, _raw, layer in self._wrappers():
            if adapter_name in layer.adapter_names:
                for k, p in layer.adapter_parameters(adapter_name).items():
                    out[f"{clean}.{k}"] = p
        if adapter_name in self.prompt_encoders:
            out.update(dict(self.prompt_encoders[adapter_name].named_parameters()))
        return out

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors (detached, sharing storage), keyed by the plain base model's module names
        with no adapter name and no `base_layer` segment:

            transformer.h.0.attn.c_attn.lora_A.weight    (r, in)      LoRA
            transformer.h.0.attn.c_attn.lora_B.weight    (out, r)
            transformer.h.0.mlp.adapter_down.weight      (m, d)       bottleneck (…attn.… too for Houlsby)
            transformer.h.0.mlp.adapter_up.bias          (d,)
            <key of the input adapter module's own state_dict>        prompt_…, prefix_… (input methods)
        """
        self._check_name(adapter_name)
        if adapter_name in self.prompt_encoders:
            return dict(self.prompt_encoders[adapter_name].state_dict())
        return {k: p.detach() for k, p in self._adapter_parameters(adapter_name).items()}

    @torch.no_grad()
    def load_adapter_state_dict(self, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy tensors into an existing adapter. Keys must be exactly `adapter_state_dict`'s and every
        shape must match; the first missing, unexpected or mismatched tensor raises a ValueError naming it.
        A merged adapter is unmerged first (with a warning): the base must lose the ΔW it got, not the new one."""
        expected = self.adapter_state_dict(adapter_name)
        _check_tensors(expected, state_dict, f"adapter {adapter_name!r}")
        if adapter_name in self._merged:
            self._unmerge_first(f"load_adapter_state_dict({adapter_name!r})")
        for key, value in state_dict.items():
            expected[key].copy_(value.to(device=expected[key].device, dtype=expected[key].dtype))

    # ------------------------------------------------------------------ counting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; tied weights count once; a quantized base weight counts as its
        out·in logical entries, not as its packed codes and statistics (buffers, or frozen block parameters
        once sharded for FSDP2)."""
        quantized = [m for m in self.base_model.modules() if not isinstance(m, nn.Linear) and is_linear_like(m)]
        packed = {id(p) for m in quantized for p in m.parameters(recurse=False) if not p.is_floating_point()}
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters() if id(p) not in packed)
        total += sum(m.in_features * m.out_features for m in quantized)
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print peft's line: `trainable params: N || all params: M || trainable%: P`."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ forward and generate
    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        return_logits: bool = True,
        adapter_names: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits (B, T, vocab), loss or None) for the real tokens only, as GPT.forward.

        Layer adapters act inside the base model; an active input adapter hands the GPT its virtual tokens
        (`prepare()`, the input-adapter protocol), which never appear in logits or the loss.

        adapter_names: one adapter name per row (``"__base__"`` for the base model), instead of the active
        adapters: a mixed-adapter batch, computed in one batched pass (mixed_batch.py). LoRA, bottleneck and
        soft-prompt (prompt tuning, P-tuning) adapters; each adapter's gradients come from its own rows.
        """
        if self._merged and targets is not None and self.training and torch.is_grad_enabled():  # a training step
            raise ValueError(f"adapters {self._merged} are merged into the base weights, so training would not "
                             "reach their parameters; call unmerge_adapter() first (or model.eval() for inference)")
        parallel = self._parallel_names(idx) if adapter_names is None else None
        if parallel is not None:  # Parallel("a", "b"): one copy of the batch per adapter, in one mixed batch
            n = len(parallel) // idx.shape[0]
            idx, adapter_names = idx.repeat(n, 1), parallel
            targets = None if targets is None else targets.repeat(n, 1)
            attention_mask = None if attention_mask is None else attention_mask.repeat(n, 1)
        if adapter_names is not None:
            with self._mixed_batch(idx, adapter_names) as virtual:
                return self.base_model(idx, targets=targets, attention_mask=attention_mask,
                                       return_logits=return_logits, **virtual)
        return self.base_model(idx, targets=targets, attention_mask=attention_mask, return_logits=return_logits,
                               **self._virtual_tokens(idx))

    def _parallel_names(self, idx: torch.Tensor) -> list[str] | None:
        """With Parallel("a", "b", …) active: the adapter names of the batch copied once per child (rows
        [i·B, (i+1)·B) run child i), which forward and generate compute as a mixed-adapter batch; else None.
        The outputs then hold n·B rows, child i's at rows i·B … (i+1)·B − 1, as in the `adapters` library."""
        block = self.active_composition
        if not isinstance(block, Parallel) or self._disabled:
            return None
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            return None  # GPT.forward gives a malformed idx its own error
        return [name for name in block.children for _ in range(idx.shape[0])]

    @torch.no_grad()
    def generate(  # GPT.generate's signature, mirrored on purpose: a PeftModel is used wherever a GPT is
        self,
        idx: torch.Tensor,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        attention_mask: torch.Tensor | None = None,
        eos_token_id: int | None = None,
        *,
        generator: torch.Generator | None = None,
        adapter_names: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """GPT.generate with the active adapters (or, with ``adapter_names``, one adapter per row, as in
        forward): returns (B, T + max_new_tokens) real token ids."""
        parallel = self._parallel_names(idx) if adapter_names is None else None
        if parallel is not None:  # one copy of the batch per Parallel child: (n·B, T + max_new_tokens)
            n = len(parallel) // idx.shape[0]
            idx, adapter_names = idx.repeat(n, 1), parallel
            attention_mask = None if attention_mask is None else attention_mask.repeat(n, 1)
        if adapter_names is not None:
            with self._mixed_batch(idx, adapter_names) as virtual:
                return self.base_model.generate(idx, max_new_tokens, do_sample, temperature, top_k,
                                                attention_mask, eos_token_id, generator=generator, **virtual)
        return self.base_model.generate(idx, max_new_tokens, do_sample, temperature, top_k, attention_mask,
                                        eos_token_id, generator=generator, **self._virtual_tokens(idx))

    @contextlib.contextmanager
    def _mixed_batch(self, idx: torch.Tensor, adapter_names: Sequence[str]) -> Iterator[dict[str, Any]]:
        """Route each row to its adapter for one call: every adapter layer gets the RowRoute; yields the GPT
        keyword arguments of the rows' soft prompts ({} when no row has one)."""
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise TypeError(f"adapter_names must be a list of adapter names, one per row, got "
                            f"{type(adapter_names).__name__}")
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:  # GPT gives malformed idx its own error
            raise ValueError(f"adapter_names needs idx of shape (B, T), got {getattr(idx, 'shape', idx)!r}")
        if len(adapter_names) != idx.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} names but the batch has {idx.shape[0]} rows: "
                             "give one adapter name (or '__base__') per row")
        for name in dict.fromkeys(adapter_names):
            if name == mixed_batch.BASE:
                continue
            if not isinstance(name, str) or name not in self.peft_config:
                raise ValueError(f"adapter_names holds {name!r}, which is not an adapter; existing adapters: "
                                 f"{list(self.peft_config)} (or '__base__' for the base model)")
            if isinstance(self.peft_config[name], PrefixTuningConfig):
                raise ValueError(f"adapter {name!r} is prefix tuning, which mixed-adapter batches do not support "
                                 "(LoRA, bottleneck adapters, prompt tuning and P-tuning do)")
        if self._merged:
            raise ValueError(f"adapters {self._merged} are merged into the base weights, so every row would get "
                             "them; call unmerge_adapter() before a mixed-adapter batch")
        if self._disabled:
            raise ValueError("adapter_names inside disable_adapter(): the base model is asked for; leave the block "
                             "or name '__base__' for those rows")
        route = mixed_batch.RowRoute.from_names(adapter_names, idx.device)
        prompts = {n: self.prompt_encoders[n].virtual_tokens() for n in route.names if n in self.prompt_encoders}
        padded = mixed_batch.prompt_for_rows(prompts, adapter_names)
        layers = [layer for _c, _r, layer in self._wrappers()]
        for layer in layers:
            layer.row_route = route
        try:
            yield {} if padded is None else {"prompt_embeds": padded[0], "prompt_mask": padded[1]}
        finally:
            for layer in layers:
                layer.row_route = None

    def _virtual_tokens(self, idx: torch.Tensor) -> dict[str, Any]:
        """The active input adapter's GPT keyword arguments for idx's batch; {} without one."""
        encoder = self._input_adapter()
        if encoder is None:
            return {}
        # A malformed idx gets GPT's own clear error; the prefix only needs a batch size to exist for it.
        batch_size = idx.shape[0] if isinstance(idx, torch.Tensor) and idx.dim() == 2 else 1
        return dict(encoder.prepare(self.base_model, batch_size))

    # ------------------------------------------------------------------ LoRA combination and merging
    def _lora_layers(self) -> list[tuple[str, str, LoraLinear]]:
        return [w for w in self._wrappers() if isinstance(w[2], LoraLinear)]

    @torch.no_grad()
    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "cat",
    ) -> None:
        """A new LoRA adapter `adapter_name` (added, not active) combining existing LoRA adapters with
        `weights`: "cat" gives exactly Σᵢ wᵢ·ΔWᵢ at rank Σr, "linear" (peft's, equal ranks) mixes A and B
        separately and adds cross terms; `lora.combine_lora` has the maths."""
        if combination_type not in COMBINATION_TYPES:
            raise ValueError(f"combination_type must be one of {COMBINATION_TYPES}, got {combination_type!r}")
        adapters = _name_list(adapters, "adapters")
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence | torch.Tensor | np.ndarray):
            raise TypeError(f"weights must be a sequence of real numbers, one per adapter, got "
                            f"{type(weights).__name__} {weights!r}")
        weights = [_finite_weight(i, w) for i, w in enumerate(weights)]
        if not adapters:
            raise ValueError("adapters must name at least one LoRA adapter")
        if len(adapters) != len(weights):
            raise ValueError(f"adapters ({len(adapters)}) and weights ({len(weights)}) must have the same length")
        for a in adapters:
            self._check_name(a)
            if not isinstance(self.peft_config[a], LoraConfig):
                raise ValueError(f"add_weighted_adapter combines LoRA adapters only; {a!r} is "
                                 f"{self.peft_config[a].method!r}")
        self._check_new_name(adapter_name)
        ranks = [self.peft_config[a].r for a in adapters]
        if combination_type == "linear" and len(set(ranks)) != 1:
            raise ValueError(f"combination_type='linear' needs adapters of equal rank, got ranks "
                             f"{dict(zip(adapters, ranks, strict=True))}; use 'cat' for different ranks")
        new_r = sum(ranks) if combination_type == "cat" else ranks[0]
        layers = [(c, m) for c, _r, m in self._lora_layers() if any(a in m.adapter_names for a in adapters)]
        first = self.peft_config[adapters[0]]
        config = LoraConfig(r=new_r, lora_alpha=new_r, lora_dropout=first.lora_dropout,  # scaling = 1
                            target_modules=[c for c, _ in layers], use_rslora=False, init_lora_weights=True,
                            base_model=self.base_model.config.to_dict())
        for _name, layer in layers:
            layer.add_adapter(adapter_name, new_r, new_r, first.lora_dropout, True, False)
            A_new = layer.lora_A[adapter_name].weight  # (new_r, in)
            B_new = layer.lora_B[adapter_name].weight  # (out, new_r)
            factors = []
            for a, r in zip(adapters, ranks, strict=True):
                if a in layer.adapter_names:
                    factors.append((layer.lora_A[a].weight, layer.lora_B[a].weight, layer.scaling[a]))
                else:  # this adapter does not touch this layer: ΔW = 0
                    factors.append((A_new.new_zeros(r, A_new.shape[1]), B_new.new_zeros(B_new.shape[0], r), 0.0))
            A, B = combine_lora(factors, weights, combination_type)
            A_new.copy_(A)
            B_new.copy_(B)
        self.peft_config[adapter_name] = config
        self._sync_layers()
        self._set_trainable()

    def _check_only_lora(self, what: str) -> None:
        others = {n: c.method for n, c in self.peft_config.items() if not isinstance(c, LoraConfig)}
        if others:
            raise ValueError(f"{what} works on LoRA adapters only; delete the others first: {others}")

    @property
    def merged_adapters(self) -> list[str]:
        """The LoRA adapters folded into the base weights by `merge_adapter` (always active ones)."""
        return list(self._merged)

    def merge_adapter(self, adapter_names: Sequence[str] | None = None) -> None:
        """Fold ΔW of active LoRA adapters (default: every active LoRA adapter) into the base weights.

        The rules, so that nothing can corrupt the base (peft's, made strict):
        - only active LoRA adapters merge: naming an inactive or a non-LoRA adapter raises, and so does
          calling it with no LoRA adapter active;
        - changing the active set (`set_adapter`, `delete_adapter`), `disable_adapter()` and writing a merged
          adapter's weights (`load_adapter_state_dict`) unmerge first, with a warning;
        - a training step on a merged model (train mode, grad enabled, targets given; and `train()` at its
          start) raises, since its LoRA parameters no longer act: unmerge first;
        - `unmerge_adapter()` gives back the base weights bit for bit (see `LoraLinear.merge`).
        """
        if isinstance(self.active_composition, Average):
            raise ValueError(f"merge_adapter with {self.active_composition!r} active would fold each adapter in "
                             "whole; make the average one adapter first (add_weighted_adapter(names, weights, "
                             "name, combination_type='cat') gives Σ wᵢ·ΔWᵢ exactly), activate and merge that")
        active_lora = [n for n in self._active if isinstance(self.peft_config[n], LoraConfig)]
        names = active_lora if adapter_names is None else _name_list(adapter_names, "adapter_names")
        for n in names:
            self._check_name(n)
            if not isinstance(self.peft_config[n], LoraConfig):
                raise ValueError(f"merge_adapter merges LoRA adapters only; {n!r} is a "
                                 f"{self.peft_config[n].method!r} adapter")
            if n not in self._active:
                raise ValueError(f"merge_adapter merges active adapters only; {n!r} is not active (active: "
                                 f"{self._active}); call set_adapter first")
        if not names:
            raise ValueError(f"merge_adapter: no LoRA adapter is active, so there is nothing to merge (active: "
                             f"{self._active})")
        # every layer is checked before any merges, so that a refusal leaves no layer merged
        shared = tied_parameter_ids(self.base_model)
        for clean, _raw, layer in self._lora_layers():
            if not any(n in layer.adapter_names for n in names):
                continue
            try:
                layer._check_mergeable()
            except ValueError as e:
                raise ValueError(f"cannot merge into {clean}: {e}") from None
            if id(layer.base_layer.weight) in shared:
                raise ValueError(f"cannot merge into {clean}: its weight is tied to another parameter (the "
                                 "token embedding); use merge_and_unload(), which unties it")
        self._check_finite_factors(names)
        for _clean, _raw, layer in self._lora_layers():
            mine = [n for n in names if n in layer.adapter_names]
            if mine:
                layer.merge(mine)
        self._merged += [n for n in names if n not in self._merged]

    def _check_finite_factors(self, names: list[str]) -> None:
        """A ValueError naming the first LoRA factor of `names` that holds NaN or inf: merged, it would be in
        the base weights (checked in every layer before any merges)."""
        for clean, _raw, layer in self._lora_layers():
            for n in names:
                if n not in layer.adapter_names:
                    continue
                for factor in (layer.lora_A[n].weight, layer.lora_B[n].weight):
                    bad = int((~torch.isfinite(factor)).sum())
                    if bad:
                        which = "lora_A" if factor is layer.lora_A[n].weight else "lora_B"
                        raise ValueError(f"adapter {n!r} cannot be merged: {clean}.{which} holds NaN or inf "
                                         f"({bad} of {factor.numel()} entries); the base weights are unchanged")

    def unmerge_adapter(self) -> None:
        """Take every merged ΔW out of the base weights again: they are the original ones, bit for bit."""
        for _c, _r, layer in self._lora_layers():
            layer.unmerge()
        self._merged = []

    def _unmerge_first(self, what: str) -> None:
        if self._merged:
            warnings.warn(f"{what}: unmerging {self._merged} first, so that merged adapters stay the active ones",
                          stacklevel=3)
            self.unmerge_adapter()

    def merge_and_unload(self, adapter_names: Sequence[str] | None = None) -> nn.Module:
        """Merge the given LoRA adapters (default: the active ones) and return the plain base model.

        Every LoraLinear is replaced by its base layer with ΔW added (an NF4 base becomes a dense nn.Linear);
        the other LoRA adapters are dropped, merged ones included (they are unmerged first). The PeftModel
        holds no adapter afterwards.
        """
        self._check_only_lora("merge_and_unload")
        if adapter_names is None and isinstance(self.active_composition, Average):
            raise ValueError(f"merge_and_unload with {self.active_composition!r} active would fold each adapter "
                             "in whole; make the average one adapter first (add_weighted_adapter(names, weights, "
                             "name, combination_type='cat') gives Σ wᵢ·ΔWᵢ exactly), activate and merge that")
        names = list(self._active) if adapter_names is None else _name_list(adapter_names, "adapter_names")
        for n in names:
            self._check_name(n)
        self._check_finite_factors(names)
        self.unmerge_adapter()  # the base weights W₀ again: only `names` go into the returned model
        for _clean, raw, layer in self._lora_layers():
            mine = [n for n in names if n in layer.adapter_names]
            set_submodule(self.base_model, raw, layer.merged_base_layer(mine))
        return self._forget_adapters()

    def merge_and_requantize(self, sample_idx: torch.Tensor,
                             adapter_names: Sequence[str] | None = None) -> tuple[nn.Module, dict[str, float]]:
        """QLoRA: merge the LoRA adapters, quantize the merged weights back to NF4, and report the error that
        costs on `sample_idx` (see `minipeft.quant.merge_and_requantize`)."""
        return quant.merge_and_requantize(self, sample_idx, adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the plain base model (its weights untouched)."""
        if any(layer.merged_adapters for _c, _r, layer in self._lora_layers()):
            raise ValueError("some LoRA adapters are merged; call unmerge_adapter() first or merge_and_unload()")
        # innermost wrappers first: a wrapper's path runs through the wrappers around it (a LoRA layer inside
        # an attention block that carries a Houlsby adapter), so those must still be in place
        for _clean, raw, layer in reversed(self._wrappers()):
            set_submodule(self.base_model, raw, layer.base_layer)
        return self._forget_adapters()

    def _forget_adapters(self) -> nn.Module:
        self.prompt_encoders = nn.ModuleDict()
        self.peft_config = {}
        self._active = []
        self._merged = []
        self.base_model.__dict__.pop(_WRAPPED_BY, None)
        return self.base_model

    # ------------------------------------------------------------------ files (the format: io.py)
    def save_adapter(self, directory: str | Path, adapter_name: str = "default", format: str = "minipeft",
                     base_model_name_or_path: str | None = None) -> None:
        """Write the adapter's config and tensors to `directory` (adapter_config.json + adapter_model.safetensors).

        format="minipeft" (every method) or "peft" (files HF peft's `PeftModel.from_pretrained` reads on a
        transformers GPT-2; an input method is written folded: a re-parametrised prompt or prefix evaluated
        once). See minipeft/tuners/io.py for both formats.
        """
        config, tensors = self._adapter_to_save(adapter_name, format, base_model_name_or_path)
        io.write_adapter(directory, config, tensors, format, base_model_name_or_path)

    def _adapter_to_save(self, adapter_name: str, format: str,
                         base_model_name_or_path: str | None) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
        """(config, tensors) that save_adapter writes for `adapter_name`, every argument and tensor checked."""
        self._check_name(adapter_name)
        config = self.peft_config[adapter_name]
        io.check_format(config, format, base_model_name_or_path)
        if format == "peft" and adapter_name in self.prompt_encoders:
            tensors = dict(self.prompt_encoders[adapter_name].fold().state_dict())
        else:
            tensors = self.adapter_state_dict(adapter_name)
        _check_finite_to_save(tensors, f"adapter {adapter_name!r}")
        return config, tensors

    def save_pretrained(self, directory: str | Path, format: str = "minipeft",
                        base_model_name_or_path: str | None = None) -> None:
        """Save every adapter, as HF peft lays them out: "default" in `directory` itself, each other adapter
        in `directory/<name>/` (the same two files `save_adapter` writes). The frozen base is not saved.
        `format` and `base_model_name_or_path` are `save_adapter`'s, for every adapter.

        Fusions go to `directory/<a,b>/` (save_adapter_fusion). When what is saved is more than "default" alone
        and active (other adapters active, a composition, a fusion, nothing active), adapter_composition.json,
        written last, records the adapters, the fusions and the active composition, and `from_pretrained`
        restores all of them; otherwise a stale one is removed (io.py).

        Everything is checked before anything is written or removed (every argument, every adapter's format,
        every tensor finite: a refused save leaves the directory as it was). Then an earlier save's
        adapter_composition.json goes first: a save that fails part way (a full disk) leaves no composition
        that would pair new adapters with an earlier save's.

        Raises:
            ValueError: no adapters (after `unload` or `merge_and_unload`), a format an adapter cannot be
                written in, base_model_name_or_path with the minipeft format, or a tensor holding NaN or inf
                (named).
            TypeError: a keyword save_pretrained does not have (a typo), a base_model_name_or_path not a str.
        """
        if not self.peft_config:
            raise ValueError("there are no adapters to save: this PeftModel's adapters were unloaded or merged "
                             "into the base (save the returned base model with save_pretrained instead)")
        check_output_dir(directory, label="directory")
        to_write = {name: self._adapter_to_save(name, format, base_model_name_or_path) for name in self.peft_config}
        for fusion in self.adapter_fusions:
            _check_finite_to_save({k: p.detach() for k, p in self._fusion_parameters(fusion).items()},
                                  f"fusion {fusion}")
        io.remove_composition(directory)
        for name, (config, tensors) in to_write.items():
            io.write_adapter(Path(directory) / io.subdirectory(name), config, tensors, format, base_model_name_or_path)
        fusions = self.adapter_fusions
        for fusion in fusions:
            self.save_adapter_fusion(Path(directory) / io.subdirectory(fusion), fusion)
        composition = self.active_composition
        if self.peft_config and (fusions or composition != Stack("default")):
            io.write_composition(directory, io.SavedComposition(list(self.peft_config), fusions, composition))
        else:
            io.remove_composition(directory)

    def load_adapter(self, directory: str | Path, adapter_name: str = "default") -> None:
        """Inject the adapter stored in `directory` (minipeft's or HF peft's format) as `adapter_name`, NOT
        activated. Nothing is changed unless everything is valid: a failed load leaves the model as it was.

        Raises:
            ValueError: an existing adapter_name, an unreadable or foreign file (io.read_adapter), a LoRA
                target that is not in this model, or a missing / unexpected / mis-shaped tensor (named).
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter_name {adapter_name!r} already exists; existing adapters: "
                             f"{list(self.peft_config)}. Delete it first or pick another name")
        config, tensors, source = _read_adapter_for(self.base_model, directory)
        with _rng_untouched(self.base_model):
            self.add_adapter(adapter_name, _creation_config(config))
        try:
            self._fill(adapter_name, config, tensors, source)
        except BaseException:
            self.delete_adapter(adapter_name)  # nothing half-loaded is left behind
            raise

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path, adapter_name: str = "default") -> PeftModel:
        """A PeftModel on `model` (wrapped in place, as `get_peft_model` does) with the adapter in `directory`
        loaded and active. If loading fails, `model` is unwrapped again and its parameters' requires_grad
        restored.

        A directory that `save_pretrained` wrote with an adapter_composition.json is restored whole: every adapter
        and fusion saved there, under its saved name, and the composition that was active (so `adapter_name`
        must be left "default"; `load_adapter` loads one of its adapters under another name)."""
        if isinstance(model, PeftModel):
            raise ValueError("model is already a PeftModel; use its load_adapter(directory, adapter_name) instead")
        saved = io.read_composition(directory)
        if saved is not None:
            if adapter_name != "default":
                raise ValueError(f"{str(directory)!r} was saved by save_pretrained with a composition, so its "
                                 f"adapters keep their saved names {saved.adapters}; leave adapter_name as 'default', "
                                 f"or use load_adapter(directory/<name>, adapter_name) for one of them")
            return cls._from_saved_composition(model, Path(directory), saved)
        return cls._from_adapter_directory(model, directory, adapter_name)

    @classmethod
    def _from_saved_composition(cls, model: nn.Module, directory: Path, saved: io.SavedComposition) -> PeftModel:
        """from_pretrained of a directory with adapter_composition.json: all its adapters, fusions, composition."""
        requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        first, *others = saved.adapters
        pm = cls._from_adapter_directory(model, directory / io.subdirectory(first), first)
        try:
            for name in others:
                pm.load_adapter(directory / io.subdirectory(name), adapter_name=name)
            for fusion in saved.fusions:
                pm.load_adapter_fusion(directory / io.subdirectory(fusion))
            if saved.active is None:
                pm._deactivate_all()
            else:
                try:
                    pm.set_adapter(saved.active)
                except ValueError as e:
                    raise ValueError(f"{directory / io.COMPOSITION_NAME}: its active composition {saved.active!r} "
                                     f"cannot be restored: {e}") from e
        except BaseException:
            _roll_back(pm, model, requires_grad)
            raise
        return pm

    @classmethod
    def _from_adapter_directory(cls, model: nn.Module, directory: str | Path, adapter_name: str) -> PeftModel:
        """from_pretrained of one adapter directory (save_adapter's files, or HF peft's)."""
        config, tensors, source = _read_adapter_for(model, directory)
        requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        with _rng_untouched(model):
            pm = cls(model, _creation_config(config), adapter_name)  # adds and activates it
        try:
            pm._fill(adapter_name, config, tensors, source)
        except BaseException:
            _roll_back(pm, model, requires_grad)
            raise
        return pm

    def _fill(self, adapter_name: str, config: PeftConfig, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Copy a file's tensors into the freshly added adapter and record the file's config (with this base)."""
        self.peft_config[adapter_name] = dataclasses.replace(config, base_model=self.base_model.config.to_dict())
        try:
            self.load_adapter_state_dict(adapter_name, tensors)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e


_WRAPPED_BY = "_minipeft_wrapped_by"  # set in a wrapped GPT's __dict__: a weak reference to its PeftModel


def _as_fuse(adapter_names: Fuse | Sequence[str] | str) -> Fuse:
    """A Fuse from what the fusion calls accept: a Fuse, a list of names, or the library's "a,b"."""
    if isinstance(adapter_names, Fuse):
        return adapter_names
    if isinstance(adapter_names, str):
        return Fuse(*adapter_names.split(","))
    if isinstance(adapter_names, (list, tuple)):
        return Fuse(*adapter_names)
    raise TypeError(f"expected Fuse('a', 'b'), a list of adapter names or 'a,b', got {adapter_names!r}")


def _check_tensors(expected: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor], owner: str) -> None:
    """A ValueError (TypeError for a non-float tensor) naming the first tensor of `state_dict` that is missing,
    unexpected, not floating point, mis-shaped or not finite, against `expected` (the keys and shapes of `owner`,
    e.g. "adapter 'a'")."""
    for key in expected:
        if key not in state_dict:
            raise ValueError(f"tensor {key!r} of {owner} is missing from the state dict")
    for key, value in state_dict.items():
        if key not in expected:
            raise ValueError(f"unexpected tensor {key!r} for {owner}; expected keys like {list(expected)[:3]}")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"tensor {key!r} for {owner} must be a floating-point tensor, got "
                            f"{type(value).__name__} {getattr(value, 'dtype', '')}")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)} "
                             f"for {owner}")
        if not torch.isfinite(value).all():
            raise ValueError(f"tensor {key!r} for {owner} holds NaN or inf "
                             f"({(~torch.isfinite(value)).sum().item()} of {value.numel()} entries)")


def _roll_back(pm: PeftModel, model: nn.Module, requires_grad: dict[str, bool]) -> None:
    """Undo a from_pretrained that failed part way: the base unwrapped, its parameters' requires_grad as before."""
    pm.unload()
    for name, p in model.named_parameters():
        p.requires_grad_(requires_grad.get(name, p.requires_grad))


def _check_not_wrapped(model: nn.Module) -> None:
    """One base, one wrapper. A second PeftModel on the same GPT would share (and change) the first one's
    layers and freezing, so the first one's outputs would change behind its back: refuse it."""
    ref = model.__dict__.get(_WRAPPED_BY)
    owner = ref() if ref is not None else None
    if (owner is not None and owner.base_model is model) or any(isinstance(m, AdapterLayer) for m in model.modules()):
        raise ValueError("model is already wrapped by a PeftModel: add adapters to that one with add_adapter(), or "
                         "release the model first with its unload() or merge_and_unload()")


def _read_adapter_for(model: nn.Module, directory: str | Path) -> tuple[PeftConfig, dict[str, torch.Tensor], str]:
    """io.read_adapter checked against `model`, and, for LoRA, every target module found in it before
    anything is injected."""
    config, tensors, source = io.read_adapter(directory, model.config.to_dict())
    if isinstance(config, LoraConfig):
        try:
            find_target_modules(model, config.target_modules)
        except ValueError as e:
            raise ValueError(f"{source}: this LoRA adapter's modules are not all in the model: {e}") from e
    return config, tensors, source


def _name_list(names: Any, what: str) -> list[str]:
    """`names` (a list, tuple, dict keys or any other iterable of adapter names) as a list; a TypeError for one
    bare name, which would otherwise be read letter by letter, or for a non-iterable."""
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        hint = f"; for one adapter write [{names!r}]" if isinstance(names, str) else ""
        raise TypeError(f"{what} must be a list of adapter names, got {type(names).__name__} {names!r}{hint}")
    return list(names)


def _check_finite_to_save(tensors: dict[str, torch.Tensor], owner: str) -> None:
    """A ValueError naming the first tensor that holds NaN or inf: written, it would be a file no load accepts."""
    for key, value in tensors.items():
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise ValueError(f"{owner} cannot be saved: tensor {key!r} holds NaN or inf ({bad} of "
                             f"{value.numel()} entries); nothing was written")


def _finite_weight(i: int, w: Any) -> float:
    """weights[i] of add_weighted_adapter as a float: a real number (a Python or numpy scalar, a 0-d tensor), finite."""
    return finite_real(w, f"weights[{i}]")


def _creation_config(config: PeftConfig) -> PeftConfig:
    """The config to create a loaded adapter with before its tensors are copied in. A TEXT-initialised prompt
    would need the tokenizer that made it; its init is overwritten at once, so create it RANDOM instead."""
    if isinstance(config, PromptTuningConfig) and config.prompt_tuning_init == "TEXT":
        return dataclasses.replace(config, prompt_tuning_init="RANDOM", prompt_tuning_init_text=None)
    return config


@contextlib.contextmanager
def _rng_untouched(model: nn.Module) -> Iterator[None]:
    """Creating an adapter draws its random init; loading throws that away, so keep the caller's RNG as it was."""
    devices = [d.index or 0 for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        yield


def get_peft_model(model: nn.Module, config: PeftConfig, adapter_name: str = "default",
                   tokenizer: Any = None) -> PeftModel:
    """Wrap `model` in place with one adapter (active and trainable) and freeze everything else.

    Example:
        pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
        pm.print_trainable_parameters()
    """
    return PeftModel(model, config, adapter_name=adapter_name, tokenizer=tokenizer)
