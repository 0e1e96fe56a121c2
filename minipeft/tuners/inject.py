"""One injection mechanism for every PEFT method, and PeftModel: named adapters on one frozen base.

Parameter-efficient fine-tuning freezes a pretrained model θ₀ and trains a small set of new parameters φ,
so that the fine-tuned model is f(x; θ₀, φ) with |φ| ≪ |θ₀| (survey: Lialin et al. 2023,
https://arxiv.org/abs/2303.15647). This module finds where φ goes and keeps track of it:

- "layer" methods put modules inside the model. LoRA wraps the targeted Linear layers (`LoraLinear`,
  lora.py); bottleneck adapters wrap each block's `attn` / `mlp` sublayer (`BottleneckLayer`,
  bottleneck.py). Targets are found as peft does: walk `named_modules()`, match a name, `get_submodule`
  the parent, `setattr` the wrapper, which keeps the original as `base_layer`.
- "input" methods (prompt tuning, P-tuning, prefix tuning) act on the model's input. Each is a module in
  `PeftModel.prompt_encoders`, made by the `create_input_adapter(config, model, tokenizer)` factory of its
  method's file, and hands `GPT.forward` / `GPT.generate` extra keyword arguments through `prepare()`.

The base model is wrapped **in place**, as peft does: `get_peft_model(model, ...)` replaces modules inside
`model` itself and freezes its parameters (requires_grad=False); nothing is deep-copied, so a large model
never exists twice. Take `copy.deepcopy(model)` first if the plain model must stay untouched. Adding,
training, switching and deleting adapters never touches a base tensor; only `merge_adapter()` and
`merge_and_unload()` change base weights, by design.

Target matching (`target_modules`, LoRA):
- a list of names: a Linear matches `t` if its name equals `t` or ends with "." + t
  (so "c_attn" finds every block's `attn.c_attn`, and "h.0.attn.c_attn" finds one);
- a string other than "all-linear": a regular expression that must match the whole name (re.fullmatch);
- "all-linear": every Linear except the output layer `lm_head`.
Names are the plain model's (a wrapper's `base_layer` segment is left out). A target that matches no Linear
raises a ValueError listing what is available.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from minipeft.tuners.bottleneck import BottleneckLayer, adapter_sites
from minipeft.tuners.config import AdapterConfig, LoraConfig, PeftConfig
from minipeft.tuners.lora import LoraLinear, is_linear_like

__all__ = ["PeftModel", "get_peft_model", "find_target_modules", "COMBINATION_TYPES"]

COMBINATION_TYPES = ("cat", "linear")

# "input" methods and the module whose create_input_adapter(config, model, tokenizer) builds them. Imported
# on first use, so this file works before (or without) those modules.
_INPUT_FACTORIES = {
    "prompt": "minipeft.tuners.prompt",
    "ptuning": "minipeft.tuners.prompt",
    "prefix": "minipeft.tuners.prefix",
}

_LAYER_WRAPPERS = (LoraLinear, BottleneckLayer)


def _clean_name(raw: str) -> str:
    """The module's name in the plain model: wrappers' `base_layer` segments removed."""
    parts = [p for p in raw.split(".") if p != "base_layer"]
    return ".".join(parts)


def _is_lm_head(name: str) -> bool:
    return name == "lm_head" or name.endswith(".lm_head")


def _linear_modules(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(clean name, raw name, module) of every Linear a LoRA adapter could wrap, in model order.

    An existing LoraLinear counts as its base Linear; the Linears that belong to adapters (lora_A/lora_B,
    adapter_down/adapter_up) are not candidates.
    """
    out, skip = [], []
    for raw, module in model.named_modules():
        if any(raw.startswith(p) for p in skip) or not raw:
            continue
        if isinstance(module, LoraLinear):
            out.append((_clean_name(raw), raw, module))
            skip.append(raw + ".")
        elif isinstance(module, BottleneckLayer):
            skip.append(raw + ".adapters.")
        elif is_linear_like(module):
            out.append((_clean_name(raw), raw, module))
    return out


def _available(names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    more = f", … ({len(names)} in all)" if len(names) > 8 else ""
    return f"leaf names {leaves}; full names {names[:8]}{more}"


def find_target_modules(
    model: nn.Module, target_modules: str | Sequence[str]
) -> list[tuple[str, str, nn.Module]]:
    """The Linear layers `target_modules` selects, as (clean name, raw name, module); see the module docstring.

    Raises ValueError when a name (or the regex) matches nothing, listing the available Linear names.
    """
    linears = _linear_modules(model)
    names = [c for c, _, _ in linears]
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            chosen = [t for t in linears if not _is_lm_head(t[0])]
        else:
            try:
                pattern = re.compile(target_modules)
            except re.error as e:
                raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression: {e}") from e
            chosen = [t for t in linears if pattern.fullmatch(t[0])]
            if not chosen:
                raise ValueError(f"target_modules regex {target_modules!r} fully matches no Linear layer; "
                                 f"available: {_available(names)}")
        return chosen
    targets = list(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must be 'all-linear', a regex string or a list of names, got {targets!r}")

    def hit(name: str, t: str) -> bool:
        return name == t or name.endswith("." + t)

    missing = [t for t in targets if not any(hit(n, t) for n in names)]
    if missing:
        raise ValueError(f"target_modules {missing} not found among the Linear layers; available: "
                         f"{_available(names)}")
    return [x for x in linears if any(hit(x[0], t) for t in targets)]


def _set_submodule(root: nn.Module, raw_name: str, new: nn.Module) -> None:
    parent_name, _, child = raw_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, n in seen.items() if n > 1}


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
    (seed 000's) are the same call, `active_adapters`, `disable_adapter()` (the base model exactly),
    `delete_adapter`, `add_weighted_adapter` (LoRA), `merge_adapter` / `unmerge_adapter` (LoRA, in place),
    `merge_and_unload` (LoRA: returns a plain GPT), `unload`, `adapter_state_dict` / `load_adapter_state_dict`,
    `get_nb_trainable_parameters`, `print_trainable_parameters`; files: `save_adapter`, `load_adapter`,
    `from_pretrained` (in io.py).

    Unknown attribute reads fall through to the base model (`pm.config`, `pm.device`, `pm.transformer`).
    """

    def __init__(self, model: nn.Module, config: PeftConfig, adapter_name: str = "default",
                 tokenizer: Any = None) -> None:
        super().__init__()
        if isinstance(model, PeftModel):
            raise ValueError("model is already a PeftModel; call add_adapter on it instead")
        if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
            raise ValueError(f"model must be a minipeft GPT (with a GPTConfig), got {type(model).__name__}")
        self.base_model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self.prompt_encoders = nn.ModuleDict()
        self._active: list[str] = []
        self._disabled = False
        for p in model.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, config, tokenizer=tokenizer)
        self.set_adapter(adapter_name)

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
        elif config.kind == "input":
            self.prompt_encoders[adapter_name] = self._create_input_adapter(config, tokenizer)
        else:
            raise ValueError(f"unknown PEFT method {config.method!r} for adapter {adapter_name!r}")
        self.peft_config[adapter_name] = config
        self._set_trainable()

    def _inject_lora(self, adapter_name: str, config: LoraConfig) -> None:
        targets = find_target_modules(self.base_model, config.target_modules)
        for _clean, raw, module in targets:
            if not isinstance(module, LoraLinear):
                module = LoraLinear(module)
                _set_submodule(self.base_model, raw, module)
            module.add_adapter(adapter_name, config.r, config.lora_alpha, config.lora_dropout,
                               config.init_lora_weights, config.use_rslora)

    def _inject_bottleneck(self, adapter_name: str, config: AdapterConfig) -> None:
        d = self.base_model.config.n_embd
        if d // config.reduction_factor < 1:
            raise ValueError(f"AdapterConfig.reduction_factor={config.reduction_factor} leaves no bottleneck "
                             f"for n_embd={d}; use reduction_factor <= {d}")
        for block in self.base_model.transformer.h:
            for site in adapter_sites(config.architecture):
                layer = getattr(block, site)
                if not isinstance(layer, BottleneckLayer):
                    layer = BottleneckLayer(layer, d)
                    setattr(block, site, layer)
                layer.add_adapter(adapter_name, config.reduction_factor, config.non_linearity)

    def _create_input_adapter(self, config: PeftConfig, tokenizer: Any) -> nn.Module:
        module_name = _INPUT_FACTORIES.get(config.method)
        if module_name is None:
            raise ValueError(f"unknown input PEFT method {config.method!r}; known: {sorted(_INPUT_FACTORIES)}")
        try:
            factory = importlib.import_module(module_name).create_input_adapter
        except (ImportError, AttributeError) as e:
            raise ValueError(f"{config.method!r} adapters need {module_name}.create_input_adapter, which is "
                             f"not available: {e}") from e
        tokenizer = tokenizer if tokenizer is not None else getattr(config, "tokenizer", None)
        return factory(config, self.base_model, tokenizer)

    def _check_name(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; existing adapters: {list(self.peft_config)}")

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; a wrapper left with no adapter is replaced by its base layer."""
        self._check_name(adapter_name)
        for _clean, raw, layer in self._wrappers():
            if adapter_name in layer.adapter_names:
                layer.delete_adapter(adapter_name)
                if not layer.adapter_names:
                    _set_submodule(self.base_model, raw, layer.base_layer)
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
        """Make exactly these adapters active (and trainable); a list stacks layer adapters in its order."""
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
        """Seed 000's spelling of set_adapter."""
        self.set_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model computes exactly the base model (no layer or input adapter runs)."""
        previous = self._disabled
        self._disabled = True
        self._sync_layers()
        try:
            yield
        finally:
            self._disabled = previous
            self._sync_layers()

    def _wrappers(self) -> list[tuple[str, str, nn.Module]]:
        return [(_clean_name(raw), raw, m) for raw, m in self.base_model.named_modules()
                if isinstance(m, _LAYER_WRAPPERS)]

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

        Seed 001: learned soft prompts are not words, but "analyzing the nearest neighbor tokens can provide
        insights". Returns one list per virtual token of `Neighbor(token_id, token, cosine)`, best first.
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
        shape must match; the first missing, unexpected or mismatched tensor raises a ValueError naming it."""
        expected = self.adapter_state_dict(adapter_name)
        for key in expected:
            if key not in state_dict:
                raise ValueError(f"tensor {key!r} of adapter {adapter_name!r} is missing from the state dict")
        for key, value in state_dict.items():
            if key not in expected:
                raise ValueError(f"unexpected tensor {key!r} for adapter {adapter_name!r}; expected keys like "
                                 f"{list(expected)[:3]}")
            if tuple(value.shape) != tuple(expected[key].shape):
                raise ValueError(f"tensor {key!r} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(expected[key].shape)} for adapter {adapter_name!r}")
        for key, value in state_dict.items():
            expected[key].copy_(value.to(device=expected[key].device, dtype=expected[key].dtype))

    # ------------------------------------------------------------------ counting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; tied weights count once; an NF4 base weight counts as its
        out·in logical entries (its codes are buffers, not parameters)."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        for m in self.base_model.modules():
            if not isinstance(m, nn.Linear) and is_linear_like(m):
                total += m.in_features * m.out_features
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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits (B, T, vocab), loss or None) for the real tokens only, as GPT.forward.

        Layer adapters act inside the base model. An active input adapter's `prepare()` returns either
        {"prompt_embeds": (n, C) or (B, n, C)}: the n virtual embeddings go in front of wte(idx), take
        positions 0 … n−1, and their logits are cut off before the loss; or {"kv_cache": KVCache}: the
        prefix keys/values are already in the cache and the real tokens take positions n … n+T−1.
        """
        encoder = self._input_adapter()
        if encoder is None:
            return self.base_model(idx, targets=targets, attention_mask=attention_mask)
        gpt = self.base_model
        B, T = idx.shape
        extra = encoder.prepare(gpt, idx, attention_mask)
        n = encoder.num_virtual_tokens
        if n + T > gpt.config.block_size:
            raise ValueError(f"num_virtual_tokens ({n}) + input length ({T}) = {n + T} exceeds the model's "
                             f"block_size ({gpt.config.block_size}); shorten the input")
        if "kv_cache" in extra:
            return gpt(idx, targets=targets, attention_mask=attention_mask, kv_cache=extra["kv_cache"])
        if "prompt_embeds" not in extra:
            raise ValueError(f"input adapter {type(encoder).__name__}.prepare returned {sorted(extra)}; expected "
                             "'prompt_embeds' or 'kv_cache'")
        tok = gpt.transformer.wte(gpt._check_idx(idx))  # (B, T, C)
        prompt = extra["prompt_embeds"]
        prompt = (prompt if prompt.dim() == 3 else prompt[None]).expand(B, -1, -1).to(tok.dtype)  # (B, n, C)
        mask = attention_mask if attention_mask is not None else torch.ones(B, T, dtype=torch.long, device=idx.device)
        mask = torch.cat([torch.ones(B, n, dtype=mask.dtype, device=mask.device), mask], dim=1)  # (B, n+T)
        logits, _ = gpt(inputs_embeds=torch.cat([prompt, tok], dim=1), attention_mask=mask)
        logits = logits[:, n:]  # (B, T, vocab): real tokens only
        loss = None
        if targets is not None:
            if targets.shape != (B, T):
                raise ValueError(f"targets must have shape {(B, T)} like the input, got {tuple(targets.shape)}")
            loss = F.cross_entropy(logits.float().reshape(B * T, -1), targets.reshape(B * T), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(
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
        extra: dict[str, Any] = {}
        encoder = self._input_adapter()
        if encoder is not None:
            extra = encoder.prepare(self.base_model, idx, attention_mask)
        return self.base_model.generate(idx, max_new_tokens, do_sample, temperature, top_k, attention_mask,
                                        eos_token_id, generator=generator, **extra)

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
        """A new LoRA adapter `adapter_name` (added, not active) combining existing LoRA adapters.

        "cat": concatenate the ranks, A' = [A₁; A₂; …] (Σr, in), B' = [w₁s₁B₁, w₂s₂B₂, …] (out, Σr), scale 1.
            B'A' = Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ, so ΔW' is *exactly* the weighted sum of the ΔWᵢ (sᵢ: each one's scaling).
        "linear" (peft's): mix A and B separately, A' = Σᵢ cᵢAᵢ, B' = Σᵢ cᵢBᵢ with cᵢ = √(wᵢsᵢ), scale 1.
            Needs equal ranks (A₁ and A₂ must be the same shape to be added), and then
            B'A' = Σᵢ cᵢ²BᵢAᵢ + Σᵢ≠ⱼ cᵢcⱼBᵢAⱼ: the weighted sum *plus cross terms* Bᵢ·Aⱼ that pair one
            adapter's down-projection with another's up-projection. The adapters' rank-r bases are unrelated,
            so those terms are noise unless the adapters share their A (or their B). It keeps rank r; "cat"
            is exact at rank Σr. (A negative wᵢ puts its sign on Aᵢ's coefficient only, so cᵢ² keeps it.)
        """
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
        if combination_type == "linear":
            if len(set(ranks)) != 1:
                raise ValueError(f"combination_type='linear' needs adapters of equal rank, got ranks "
                                 f"{dict(zip(adapters, ranks, strict=True))}; use 'cat' for different ranks")
            new_r = ranks[0]
        else:
            new_r = sum(ranks)
        layers = [(c, m) for c, _r, m in self._lora_layers() if any(a in m.adapter_names for a in adapters)]
        first = self.peft_config[adapters[0]]
        config = LoraConfig(r=new_r, lora_alpha=new_r, lora_dropout=first.lora_dropout,  # scaling = 1
                            target_modules=[c for c, _ in layers], use_rslora=False, init_lora_weights=True,
                            base_model=self.base_model.config.to_dict())
        for _clean, layer in layers:
            layer.add_adapter(adapter_name, new_r, new_r, first.lora_dropout, True, False)
            A_new = layer.lora_A[adapter_name].weight  # (new_r, in)
            B_new = layer.lora_B[adapter_name].weight  # (out, new_r)
            A_new.zero_()
            B_new.zero_()
            offset = 0
            for a, w, r in zip(adapters, weights, ranks, strict=True):
                if a not in layer.adapter_names:  # this adapter does not touch this layer: ΔW = 0
                    offset += r if combination_type == "cat" else 0
                    continue
                A, B, s = layer.lora_A[a].weight, layer.lora_B[a].weight, layer.scaling[a]
                if combination_type == "cat":
                    A_new[offset:offset + r] = A
                    B_new[:, offset:offset + r] = (w * s) * B
                    offset += r
                else:
                    c = (abs(w * s)) ** 0.5
                    A_new += (c if w * s >= 0 else -c) * A
                    B_new += c * B
        self.peft_config[adapter_name] = config
        self._sync_layers()
        self._set_trainable()

    def _check_only_lora(self, what: str) -> None:
        others = {n: c.method for n, c in self.peft_config.items() if not isinstance(c, LoraConfig)}
        if others:
            raise ValueError(f"{what} works on LoRA adapters only; delete the others first: {others}")

    def merge_adapter(self, adapter_names: Sequence[str] | None = None) -> None:
        """Fold ΔW of the given LoRA adapters (default: the active ones) into the base weights, in place."""
        names = self._active if adapter_names is None else list(adapter_names)
        for n in names:
            self._check_name(n)
        shared = _shared_parameter_ids(self.base_model)
        for clean, _raw, layer in self._lora_layers():
            mine = [n for n in names if n in layer.adapter_names]
            if mine and isinstance(layer.base_layer, nn.Linear) and id(layer.base_layer.weight) in shared:
                raise ValueError(f"cannot merge into {clean}: its weight is tied to another parameter (the "
                                 "token embedding); use merge_and_unload(), which unties it")
            if mine:
                layer.merge(mine)

    def unmerge_adapter(self) -> None:
        """Subtract every merged ΔW again (exact up to float rounding)."""
        for _c, _r, layer in self._lora_layers():
            layer.unmerge()

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
            _set_submodule(self.base_model, raw, layer.merged_base_layer(mine))
        return self._forget_adapters()

    @torch.no_grad()
    def merge_and_requantize(self, sample_idx: torch.Tensor,
                             adapter_names: Sequence[str] | None = None) -> tuple[nn.Module, dict[str, float]]:
        """QLoRA only, and explicit: merge the LoRA adapters, then quantize the merged weights back to NF4.

        `merge_and_unload` on a 4-bit base returns dense layers (dequantize(W₀) + ΔW), which is exact but
        no longer 4-bit. Requantizing gives a 4-bit model again, at a price: NF4 has 16 levels per block,
        so round(W₀ + ΔW) ≠ W₀ + ΔW and a small ΔW can be rounded away entirely — peft's most reported QLoRA
        pain point. This method makes that price visible: it returns the requantized model and the measured
        error of its logits on `sample_idx` (B, T) against the adapted model before merging:
        {"dense_max_abs", "requantized_max_abs", "requantized_rel"} (rel = ‖Δ‖/‖logits‖).
        """
        from minipeft.quant import NF4Linear

        quantized = {raw: (layer.base_layer.blocksize, layer.base_layer.double_quant)
                     for _clean, raw, layer in self._lora_layers() if isinstance(layer.base_layer, NF4Linear)}
        if not quantized:
            raise ValueError("merge_and_requantize needs LoRA on an NF4 base (QLoRA); use merge_and_unload")
        adapted, _ = self(sample_idx)
        model = self.merge_and_unload(adapter_names)
        dense, _ = model(sample_idx)
        for raw, (blocksize, double_quant) in quantized.items():
            _set_submodule(model, raw, NF4Linear.from_linear(model.get_submodule(raw), blocksize, double_quant))
        requantized, _ = model(sample_idx)
        report = {"dense_max_abs": (dense - adapted).abs().max().item(),
                  "requantized_max_abs": (requantized - adapted).abs().max().item(),
                  "requantized_rel": ((requantized - adapted).norm() / adapted.norm()).item()}
        return model, report

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the plain base model (its weights untouched)."""
        if any(layer.merged_adapters for _c, _r, layer in self._lora_layers()):
            raise ValueError("some LoRA adapters are merged; call unmerge_adapter() first or merge_and_unload()")
        for _clean, raw, layer in self._wrappers():
            _set_submodule(self.base_model, raw, layer.base_layer)
        return self._forget_adapters()

    def _forget_adapters(self) -> nn.Module:
        self.prompt_encoders = nn.ModuleDict()
        self.peft_config = {}
        self._active = []
        return self.base_model

    # ------------------------------------------------------------------ files (minipeft/tuners/io.py)
    def save_adapter(self, directory: str, adapter_name: str = "default", **kwargs: Any) -> None:
        """Write the adapter's config and tensors to `directory` (see minipeft.tuners.io.save_adapter)."""
        from minipeft.tuners import io

        io.save_adapter(self, directory, adapter_name, **kwargs)

    def save_pretrained(self, directory: str, **kwargs: Any) -> None:
        """Save every adapter, as HF peft lays them out: "default" in `directory` itself, each other adapter
        in `directory/<name>/` (the same two files `save_adapter` writes). The frozen base is not saved.
        Keyword arguments (`format=`, …) go to `save_adapter`."""
        from minipeft.tuners import io

        for name in self.peft_config:
            target = Path(directory) if name == "default" else Path(directory) / name
            io.save_adapter(self, target, name, **kwargs)

    def load_adapter(self, directory: str, adapter_name: str = "default", **kwargs: Any) -> None:
        """Inject the adapter stored in `directory` as `adapter_name`, not activated (see minipeft.tuners.io)."""
        from minipeft.tuners import io

        io.load_adapter(self, directory, adapter_name, **kwargs)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str, adapter_name: str = "default",
                        **kwargs: Any) -> PeftModel:
        """A PeftModel on `model` with the adapter in `directory` loaded and active (see minipeft.tuners.io)."""
        from minipeft.tuners import io

        return io.from_pretrained(model, directory, adapter_name, **kwargs)


def get_peft_model(model: nn.Module, config: PeftConfig, adapter_name: str = "default",
                   tokenizer: Any = None) -> PeftModel:
    """Wrap `model` in place with one adapter (active and trainable) and freeze everything else.

    Example:
        pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
        pm.print_trainable_parameters()
    """
    return PeftModel(model, config, adapter_name=adapter_name, tokenizer=tokenizer)
