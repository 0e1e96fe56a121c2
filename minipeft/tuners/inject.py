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
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from minipeft import quant
from minipeft.targets import (
    find_target_modules,
    is_linear_like,
    named_layers,
    set_submodule,
    tied_parameter_ids,
)
from minipeft.tuners import io, prefix, prompt
from minipeft.tuners.bottleneck import BottleneckLayer, adapter_sites
from minipeft.tuners.config import (
    AdapterConfig,
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

    Adapters: `add_adapter` (added, not active), `set_adapter` (a name or a list: only those are active and
    only their parameters require grad; layer adapters in a list stack in order, at most one input adapter),
    `train_adapter` / `set_active_adapters` (the `adapters` library's names) and `set_active_adapter`
    (the PEFT course notes' spelling) are the same call, `active_adapters`, `disable_adapter()` (the base
    model exactly), `delete_adapter`, `add_weighted_adapter` (LoRA), `merge_adapter` / `unmerge_adapter`
    (LoRA, in place), `merge_and_unload` (LoRA: returns a plain GPT), `merge_and_requantize` (QLoRA),
    `unload`, `adapter_state_dict` / `load_adapter_state_dict`, `get_nb_trainable_parameters`,
    `print_trainable_parameters`; files: `save_adapter`, `save_pretrained`, `load_adapter`, `from_pretrained`.

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
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter_name {adapter_name!r} already exists; existing adapters: "
                             f"{list(self.peft_config)}. Delete it first or pick another name")
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

    def _check_name(self, adapter_name: str) -> None:
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
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str]:
        """peft's singular spelling: the name when one adapter is active, else the list."""
        return self._active[0] if len(self._active) == 1 else list(self._active)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make exactly these adapters active (and trainable); a list stacks layer adapters in its order.
        Merged adapters are unmerged first (with a warning): what is merged always equals what is active."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names:
            raise ValueError("set_adapter needs at least one adapter name (use disable_adapter() for the base)")
        for n in names:
            self._check_name(n)
        if len(set(names)) != len(names):
            raise ValueError(f"set_adapter got a name twice: {names}")
        inputs = [n for n in names if self.peft_config[n].kind == "input"]
        if len(inputs) > 1:
            raise ValueError(f"only one input adapter (prompt/prefix/P-tuning) can be active at a time, got {inputs}")
        if names != self._active:
            self._unmerge_first(f"set_adapter({names})")
        self._active = names
        self._sync_layers()
        self._set_trainable()

    def train_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """The `adapters` library's name: activate these adapters and make only them trainable."""
        self.set_adapter(adapter_name)

    def set_active_adapters(self, adapter_name: str | Sequence[str]) -> None:
        """The `adapters` library's name for set_adapter."""
        self.set_adapter(adapter_name)

    def set_active_adapter(self, adapter_name: str | Sequence[str]) -> None:
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
        for _c, _r, layer in self._wrappers():
            layer.active_adapters = [n for n in self._active if n in layer.adapter_names]
            layer.disabled = self._disabled

    def _set_trainable(self) -> None:
        """Only the active adapters' parameters require grad; the base never does."""
        for name in self.peft_config:
            for p in self._adapter_parameters(name).values():
                p.requires_grad_(name in self._active)

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
        for key in expected:
            if key not in state_dict:
                raise ValueError(f"tensor {key!r} of adapter {adapter_name!r} is missing from the state dict")
        for key, value in state_dict.items():
            if key not in expected:
                raise ValueError(f"unexpected tensor {key!r} for adapter {adapter_name!r}; expected keys like "
                                 f"{list(expected)[:3]}")
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise TypeError(f"tensor {key!r} for adapter {adapter_name!r} must be a floating-point tensor, got "
                                f"{type(value).__name__} {getattr(value, 'dtype', '')}")
            if tuple(value.shape) != tuple(expected[key].shape):
                raise ValueError(f"tensor {key!r} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(expected[key].shape)} for adapter {adapter_name!r}")
            if not torch.isfinite(value).all():
                raise ValueError(f"tensor {key!r} for adapter {adapter_name!r} holds NaN or inf "
                                 f"({(~torch.isfinite(value)).sum().item()} of {value.numel()} entries)")
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
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits (B, T, vocab), loss or None) for the real tokens only, as GPT.forward.

        Layer adapters act inside the base model; an active input adapter hands the GPT its virtual tokens
        (`prepare()`, the input-adapter protocol), which never appear in logits or the loss.
        """
        if self._merged and targets is not None and self.training and torch.is_grad_enabled():  # a training step
            raise ValueError(f"adapters {self._merged} are merged into the base weights, so training would not "
                             "reach their parameters; call unmerge_adapter() first (or model.eval() for inference)")
        return self.base_model(idx, targets=targets, attention_mask=attention_mask, return_logits=return_logits,
                               **self._virtual_tokens(idx))

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
    ) -> torch.Tensor:
        """GPT.generate with the active adapters: returns (B, T + max_new_tokens) real token ids."""
        return self.base_model.generate(idx, max_new_tokens, do_sample, temperature, top_k, attention_mask,
                                        eos_token_id, generator=generator, **self._virtual_tokens(idx))

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
        adapters, weights = list(adapters), [float(w) for w in weights]
        if not adapters:
            raise ValueError("adapters must name at least one LoRA adapter")
        if len(adapters) != len(weights):
            raise ValueError(f"adapters ({len(adapters)}) and weights ({len(weights)}) must have the same length")
        for a in adapters:
            self._check_name(a)
            if not isinstance(self.peft_config[a], LoraConfig):
                raise ValueError(f"add_weighted_adapter combines LoRA adapters only; {a!r} is "
                                 f"{self.peft_config[a].method!r}")
        if not isinstance(adapter_name, str) or adapter_name in self.peft_config:
            raise ValueError(f"adapter_name {adapter_name!r} already exists (or is not a string); existing "
                             f"adapters: {list(self.peft_config)}")
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
        active_lora = [n for n in self._active if isinstance(self.peft_config[n], LoraConfig)]
        names = active_lora if adapter_names is None else list(adapter_names)
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
        shared = tied_parameter_ids(self.base_model)
        for clean, _raw, layer in self._lora_layers():
            mine = [n for n in names if n in layer.adapter_names]
            if mine and isinstance(layer.base_layer, nn.Linear) and id(layer.base_layer.weight) in shared:
                raise ValueError(f"cannot merge into {clean}: its weight is tied to another parameter (the "
                                 "token embedding); use merge_and_unload(), which unties it")
        for _clean, _raw, layer in self._lora_layers():
            mine = [n for n in names if n in layer.adapter_names]
            if mine:
                layer.merge(mine)
        self._merged += [n for n in names if n not in self._merged]

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
        the other LoRA adapters are dropped. The PeftModel holds no adapter afterwards.
        """
        self._check_only_lora("merge_and_unload")
        names = self._active if adapter_names is None else list(adapter_names)
        for n in names:
            self._check_name(n)
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
        for _clean, raw, layer in self._wrappers():
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
        self._check_name(adapter_name)
        config = self.peft_config[adapter_name]
        io.check_format(config, format)
        if format == "peft" and adapter_name in self.prompt_encoders:
            tensors = dict(self.prompt_encoders[adapter_name].fold().state_dict())
        else:
            tensors = self.adapter_state_dict(adapter_name)
        io.write_adapter(directory, config, tensors, format, base_model_name_or_path)

    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> None:
        """Save every adapter, as HF peft lays them out: "default" in `directory` itself, each other adapter
        in `directory/<name>/` (the same two files `save_adapter` writes). The frozen base is not saved.
        Keyword arguments (`format=`, …) go to `save_adapter`."""
        for name in self.peft_config:
            self.save_adapter(Path(directory) if name == "default" else Path(directory) / name, name, **kwargs)

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
        restored."""
        if isinstance(model, PeftModel):
            raise ValueError("model is already a PeftModel; use its load_adapter(directory, adapter_name) instead")
        config, tensors, source = _read_adapter_for(model, directory)
        requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        with _rng_untouched(model):
            pm = cls(model, _creation_config(config), adapter_name)  # adds and activates it
        try:
            pm._fill(adapter_name, config, tensors, source)
        except BaseException:
            pm.unload()
            for name, p in model.named_parameters():
                p.requires_grad_(requires_grad.get(name, p.requires_grad))
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
