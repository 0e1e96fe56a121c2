"""The input-adapter protocol: what prompt tuning, P-tuning and prefix tuning hand to the frozen GPT.

Layer methods (LoRA, bottleneck adapters) live *inside* the model. Input methods leave every module alone
and give the model n extra "virtual tokens" instead, in one of two forms:

    soft prompt (prompt tuning, P-tuning)    n embeddings P (n, C) in front of wte(idx):
                                             GPT(idx, prompt_embeds=P) reads [P ; wte(x₁) … wte(x_T)]
    prefix (prefix tuning)                   n keys and values per layer already in the KV cache:
                                             GPT(idx, kv_cache=KVCache.from_prefix(keys, values))

Either way the virtual tokens take positions 0 … n−1 and the real tokens n … n+T−1 (as HF peft does on
GPT-2), every real token can attend to all of them, and logits, targets and generated ids cover the real
tokens only. So n + T ≤ block_size; `GPT.check_length` is the one place that rule is checked, whichever form
the virtual tokens take.

An input adapter is an nn.Module with:

    num_virtual_tokens: int
    prepare(model, batch_size) -> {"prompt_embeds": (n, C) or (B, n, C)}  or  {"kv_cache": KVCache}
        keyword arguments for `GPT.forward` and `GPT.generate`, exactly one of the two; differentiable
        in the adapter's parameters, so the same call serves training and generation.
    fold() -> an input adapter with the same output and nothing left to compute (a re-parametrised prompt
        or prefix evaluated once); a plain one folds to a copy of itself. Export to HF peft's files uses it.

`PeftModel.forward` and `PeftModel.generate` call `prepare` on the active input adapter and pass what it
returns to the GPT; at most one input adapter is active at a time.
"""

from __future__ import annotations

from typing import Protocol, TypedDict, runtime_checkable

import torch

from minipeft.model import GPT, KVCache

__all__ = ["InputAdapter", "VirtualTokens"]


class VirtualTokens(TypedDict, total=False):
    """What `prepare` returns: GPT keyword arguments, exactly one of these keys."""

    prompt_embeds: torch.Tensor  # (n, C) or (B, n, C)
    kv_cache: KVCache  # holding n prefix keys/values per layer for a batch of B


@runtime_checkable
class InputAdapter(Protocol):
    """An input method's module: see the module docstring."""

    num_virtual_tokens: int

    def prepare(self, model: GPT, batch_size: int) -> VirtualTokens: ...

    def fold(self) -> InputAdapter: ...
