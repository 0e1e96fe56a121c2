"""A small GPT with the GPT-2 architecture, written to be read.

The model maps token ids to next-token logits with a stack of pre-LayerNorm transformer blocks:

    h₀ = wte[idx] + wpe[pos]
    hₗ = hₗ₋₁ + Attn(LN₁(hₗ₋₁));  hₗ = hₗ + MLP(LN₂(hₗ))      for l = 1 … L
    logits = LN_f(h_L) · wteᵀ                                  (lm_head is tied to wte)

with causal multi-head attention softmax(q·kᵀ/√d)·v and an MLP of width 4C with GELU (tanh form). Module
names mirror Hugging Face's GPT-2 (`transformer.h.0.attn.c_attn`, `mlp.c_fc`, …) so that checkpoints, peft
target names and adapter files line up. Papers: GPT-2, Radford et al. 2019,
https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf;
the layout follows nanoGPT (https://github.com/karpathy/nanoGPT).

Two extension points serve the PEFT methods without this file knowing about them (the input-adapter
protocol, minipeft/tuners/input_adapter.py, says what each method hands over):
- `prompt_embeds` lets prompt tuning and P-tuning put n virtual-token embeddings in front of the input;
  they take positions 0 … n−1, and logits and loss cover the real tokens only;
- `KVCache` lets prefix tuning put learned key/value pairs in front of every layer's cache, and makes
  `generate()` cheap: each new token attends to the cached keys instead of recomputing them.
Either way the virtual tokens use up positions, so n + T ≤ block_size: `check_length` is that rule.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

from minipeft.checkpoint import save_json, save_safetensors
from minipeft.checks import is_finite as _is_finite
from minipeft.checks import shown as _show

logger = logging.getLogger(__name__)


@dataclass
class GPTConfig:
    block_size: int = 256  # longest sequence (positions) the model can see
    vocab_size: int = 260  # 256 bytes + 4 special tokens (see minipeft.tokenizer)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        """Check every field: a wrong type is a TypeError, a value out of range a ValueError, both naming the
        field. Checked here once, so the modules built from a config trust it (a NaN epsilon would only show up
        as NaN logits, a string one as a failure deep inside nn.LayerNorm)."""
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):  # True is an int to Python, not here
                raise TypeError(f"GPTConfig.{name} must be a positive int, got {type(value).__name__} {_show(value)}")
            if value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {_show(value)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd ({_show(self.n_embd)}) must be divisible by n_head "
                             f"({_show(self.n_head)})")
        for name in ("dropout", "layer_norm_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"GPTConfig.{name} must be a real number (int or float), got "
                                f"{type(value).__name__} {_show(value)}")
        if not _is_finite(self.dropout) or not 0.0 <= self.dropout < 1.0:  # p = 1 would drop everything
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {_show(self.dropout)}")
        if not _is_finite(self.layer_norm_epsilon) or self.layer_norm_epsilon <= 0:
            raise ValueError(f"GPTConfig.layer_norm_epsilon must be a finite number > 0 (GPT-2's is 1e-5), got "
                             f"{_show(self.layer_norm_epsilon)}")
        if not isinstance(self.bias, bool):  # "no" would be truthy: the intent of a string or an int is unclear
            raise TypeError(f"GPTConfig.bias must be True or False, got {type(self.bias).__name__} {_show(self.bias)}")

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, plus which of them are real.

    keys[l], values[l]: (B, nh, L, hs). `valid` (B, L) is False at padded positions, so that later tokens
    never attend to them. `seen` (B,) counts the real tokens already placed, which gives the next position.
    Prefix tuning fills the cache with n learned pairs and sets `seen` to n, so real tokens take positions
    n … n+T−1, as in HF peft.
    """

    def __init__(self, n_layer: int, batch_size: int, device: torch.device | str | None = None) -> None:
        for name, value, least in (("n_layer", n_layer, 1), ("batch_size", batch_size, 0)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"KVCache: {name} must be an int >= {least}, got {type(value).__name__} {_show(value)}")
            if value < least:
                raise ValueError(f"KVCache: {name} must be an int >= {least}, got {_show(value)}")
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    @classmethod
    def from_prefix(cls, keys: list[torch.Tensor], values: list[torch.Tensor]) -> KVCache:
        """A cache that starts with per-layer prefixes keys[l], values[l]: (B, nh, n, hs), all visible."""
        if not isinstance(keys, list | tuple) or not isinstance(values, list | tuple):
            raise TypeError(f"KVCache.from_prefix: keys and values must be lists of (B, nh, n, hs) tensors, one per "
                            f"layer, got {type(keys).__name__} and {type(values).__name__}")
        if not keys or len(keys) != len(values):
            raise ValueError(f"KVCache.from_prefix: keys and values must hold one tensor per layer (at least one), "
                             f"got {len(keys)} keys and {len(values)} values")
        first = keys[0]
        for what, tensors in (("keys", keys), ("values", values)):
            for i, t in enumerate(tensors):
                if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape != getattr(first, "shape", None):
                    raise ValueError(f"KVCache.from_prefix: {what}[{i}] must be a (B, nh, n, hs) tensor of keys[0]'s "
                                     f"shape, got {type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
        B, _, n, _ = keys[0].shape
        cache = cls(len(keys), B, device=keys[0].device)
        cache.keys, cache.values = list(keys), list(values)
        cache.valid = torch.ones(B, n, dtype=torch.bool, device=keys[0].device)
        cache.seen = torch.full((B,), n, dtype=torch.long, device=keys[0].device)
        return cache

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the batch rows in `index` (used when a batch is expanded or filtered)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.valid, self.seen = self.valid.index_select(0, index), self.seen.index_select(0, index)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v fused
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            if cache.keys[layer] is not None:
                k = torch.cat([cache.keys[layer].to(k.dtype), k], dim=2)  # (B, nh, L+T, hs)
                v = torch.cat([cache.values[layer].to(v.dtype), v], dim=2)
            cache.keys[layer], cache.values[layer] = k, v
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None:  # plain causal attention, no cache, no padding: the fused fast path
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): re-assemble the heads
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """One pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, cache: KVCache | None, layer: int):
        x = x + self.attn(self.ln_1(x), attn_mask, cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """GPT-2: token + position embeddings, `n_layer` blocks, a final LayerNorm and a tied LM head.

    Forward contract (shared by every PEFT wrapper):
        logits, loss = model(idx, targets=None, attention_mask=None)
        idx (B, T) token ids; logits (B, T, vocab) at every position; targets (B, T) are already shifted by
        the caller and -100 is ignored; loss is the mean cross-entropy or None. attention_mask (B, T) holds
        1 for real tokens and 0 for padding (right padding for training, left padding for generation).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2's scaled init: residual projections get std 0.02/√(2L) so the residual stream's variance
        # does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count; the tied lm_head is counted once (named_parameters de-duplicates it)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        idx: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_logits: bool = True,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab) and the loss (or None). See the class docstring for the contract.

        inputs_embeds (B, T, C) replaces `wte[idx]`.
        prompt_embeds (n, C) or (B, n, C): virtual tokens put in front of the input (prompt tuning). They
            take positions 0 … n−1, every real token attends to them, and their logits are cut off: logits
            stay (B, T, vocab) and targets (B, T).
        prompt_mask (B, n) bool, with a (B, n, C) prompt_embeds: which virtual tokens a row has (a mixed-adapter
            batch left-pads shorter prompts): the others are masked out of attention and of the positions, so
            a row with n_b virtual tokens gives them positions 0 … n_b−1, as it would alone.
        kv_cache, when given, holds earlier keys/values (a prefix, or tokens already generated) and is
            extended in place with this call's tokens.
        return_logits=False (with targets; the trainer's call): logits is None and the loss is computed a
            chunk of rows at a time (`chunked_cross_entropy`), so the (B·T, vocab) fp32 logits never exist
            whole, in the forward or the backward.
        logits_to_keep=k > 0 (without targets): the logits of the last k positions only, (B, k, vocab) — what
            generation needs from its prompt (k = 1), without the (B, T, vocab) that the output layer would
            otherwise compute and hold (GPT-2's vocabulary: 50,257 numbers a position). As transformers' argument.
        """
        if not return_logits and targets is None:
            raise ValueError("return_logits=False needs targets: without them the logits are the only output")
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0: every position), got {logits_to_keep!r}")
        if logits_to_keep and targets is not None:
            raise ValueError("logits_to_keep > 0 with targets: the loss needs the logits of every position; "
                             "leave logits_to_keep at 0 (or use return_logits=False for the loss alone)")
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("GPT.forward needs exactly one of idx or inputs_embeds")
        if inputs_embeds is None:
            idx = self._check_idx(idx)
            tok_emb = self.transformer.wte(idx)  # (B, T, C)
        else:
            self._check_embeds("inputs_embeds", inputs_embeds, (3,), f"(B, T, {self.config.n_embd})")
            tok_emb = inputs_embeds
        B, T, _ = tok_emb.shape
        self._check_cache(kv_cache, B)
        if prompt_mask is not None and prompt_embeds is None:
            raise ValueError("prompt_mask says which virtual tokens of prompt_embeds a row has; it was given "
                             "without prompt_embeds")
        if targets is not None:
            self._check_targets(targets, B, T)
        valid = self._check_mask(attention_mask, B, T, tok_emb.device)  # (B, T) bool or None
        n_virtual = 0
        if prompt_embeds is not None:
            tok_emb, valid = self._prepend(prompt_embeds, tok_emb, valid, prompt_mask)  # (B, n+T, C), (B, n+T)
            n_virtual = prompt_embeds.shape[-2]

        # Positions count real tokens only, so a padded sequence gets the positions it would get alone.
        seen = kv_cache.seen if kv_cache is not None else torch.zeros(B, dtype=torch.long, device=tok_emb.device)
        L = tok_emb.shape[1]  # n_virtual + T
        if valid is None:
            pos = seen[:, None] + torch.arange(L, device=tok_emb.device)  # (B, L)
        else:
            pos = seen[:, None] + (valid.long().cumsum(dim=1) - 1).clamp_min(0)  # (B, L)
        if pos.numel() and _may_read_values(pos):  # reading pos is a host sync
            self.check_length(int(pos.max()) + 1, detail=f"{int(seen.max())} cached + {n_virtual} virtual + "
                                                          f"{T} input tokens")

        attn_mask = self._attention_mask(valid, kv_cache, B, L, tok_emb.device)
        x = self.transformer.drop(tok_emb + self.transformer.wpe(pos))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, attn_mask, kv_cache, layer)
        x = self.transformer.ln_f(x)[:, n_virtual:]  # (B, T, C): real tokens only

        if kv_cache is not None:  # record what this call added to the cache
            new_valid = valid if valid is not None else torch.ones(B, L, dtype=torch.bool, device=x.device)
            kv_cache.valid = torch.cat([kv_cache.valid, new_valid], dim=1)
            kv_cache.seen = kv_cache.seen + new_valid.sum(dim=1)

        if not return_logits:
            return None, chunked_cross_entropy(self.lm_head, x.reshape(B * T, -1), targets.reshape(B * T))
        if logits_to_keep:
            x = x[:, -logits_to_keep:]  # (B, k, C)
        logits = head_logits(self.lm_head, x)  # (B, T or k, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(B * T, -1), targets.reshape(B * T).long(),
                                   ignore_index=-100)  # int32 targets are accepted: F.cross_entropy wants int64
        return logits, loss

    def check_length(self, positions: int, detail: str = "") -> None:
        """The one length rule: a sequence uses `positions` positions — cached tokens (a prefix, or tokens
        already generated) and virtual tokens (a soft prompt) included — and the model has block_size of them.
        `detail` says what the positions are made of, for the error message."""
        if positions > self.config.block_size:
            raise ValueError(f"sequence too long: {positions} positions ({detail}) but the model's block_size is "
                             f"{self.config.block_size}; shorten the input (or lower num_virtual_tokens)")

    def _prepend(
        self, prompt_embeds: torch.Tensor, tok_emb: torch.Tensor, valid: torch.Tensor | None,
        prompt_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[P ; tok_emb] (B, n+T, C) and the mask with the virtual tokens marked valid (all n, or those of
        prompt_mask (B, n))."""
        B, T = tok_emb.shape[:2]
        self._check_embeds("prompt_embeds", prompt_embeds, (2, 3),
                           f"(n, {self.config.n_embd}) or (B, n, {self.config.n_embd})")
        prompt = (prompt_embeds if prompt_embeds.dim() == 3 else prompt_embeds[None]).expand(B, -1, -1)  # (B, n, C)
        emb = torch.cat([prompt.to(tok_emb.dtype), tok_emb], dim=1)  # (B, n+T, C)
        if prompt_mask is None:
            if valid is None:
                return emb, None
            prompt_mask = torch.ones(B, prompt.shape[1], dtype=torch.bool, device=valid.device)
        elif not isinstance(prompt_mask, torch.Tensor):
            raise TypeError(f"prompt_mask must be a bool tensor (B, n), got {type(prompt_mask).__name__}")
        elif prompt_mask.shape != prompt.shape[:2] or prompt_mask.dtype != torch.bool:
            raise ValueError(f"prompt_mask must be bool of shape {tuple(prompt.shape[:2])} (B, n), got "
                             f"{prompt_mask.dtype} {tuple(prompt_mask.shape)}")
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=prompt_mask.device)
        return emb, torch.cat([prompt_mask.to(valid.device), valid], dim=1)  # (B, n+T)

    # Checks that read tensor values need the host (a GPU→CPU sync); they run only when the code is not being
    # compiled or captured into a CUDA graph (`_may_read_values`), so that torch.compile traces the forward
    # without a graph break and a serving loop can capture it.
    def _check_embeds(self, name: str, embeds: torch.Tensor, dims: tuple[int, ...], shape: str) -> None:
        """inputs_embeds or prompt_embeds: a floating tensor of `shape` (`dims` dimensions, n_embd last), finite
        (one NaN would make every logit of its rows NaN; a diverged prompt-tuning run leaves them there)."""
        if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor {shape}, got {type(embeds).__name__} "
                            f"{getattr(embeds, 'dtype', '')}")
        if embeds.dim() not in dims or embeds.shape[-1] != self.config.n_embd:
            raise ValueError(f"{name} must be {shape}, got {tuple(embeds.shape)}")
        if embeds.numel() and _may_read_values(embeds):
            n_bad = int((~torch.isfinite(embeds.detach())).sum())
            if n_bad:
                raise ValueError(f"{name} holds {n_bad} NaN or inf values (of {embeds.numel()}); they would make "
                                 "the logits NaN")

    def _check_cache(self, kv_cache: KVCache | None, B: int) -> None:
        """A KVCache made for this model (one entry per layer) and a batch of B rows, or None."""
        if kv_cache is None:
            return
        if not isinstance(kv_cache, KVCache):
            raise TypeError(f"kv_cache must be a KVCache or None, got {type(kv_cache).__name__}")
        if len(kv_cache.keys) != self.config.n_layer or kv_cache.seen.shape[0] != B:
            raise ValueError(f"kv_cache holds {len(kv_cache.keys)} layers for a batch of {kv_cache.seen.shape[0]}, "
                             f"but the model has n_layer {self.config.n_layer} and the input {B} rows: "
                             f"KVCache({self.config.n_layer}, {B})")

    def _check_idx(self, idx: torch.Tensor) -> torch.Tensor:
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.long, torch.int32, torch.int64):
            raise TypeError(f"idx must be an integer tensor of token ids, got {type(idx).__name__} "
                            f"{getattr(idx, 'dtype', '')}")
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"idx must be (B, T) with T >= 1, got shape {tuple(idx.shape)}")
        if idx.numel() and _may_read_values(idx):
            lo, hi = torch.stack([idx.min(), idx.max()]).tolist()
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"idx holds token ids in [{lo}, {hi}] but vocab_size is {self.config.vocab_size} "
                                 f"(valid ids: 0 … {self.config.vocab_size - 1})")
        return idx.long()

    def _check_targets(self, targets: torch.Tensor, B: int, T: int) -> None:
        if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.long, torch.int32, torch.int64):
            raise TypeError(f"targets must be an integer tensor of token ids (-100 to ignore a position), got "
                            f"{type(targets).__name__} {getattr(targets, 'dtype', '')}")
        if targets.shape != (B, T):
            raise ValueError(f"targets must have shape {(B, T)} like the input, got {tuple(targets.shape)}")
        if not _may_read_values(targets):
            return
        kept = targets != -100
        out_of_range = kept & ((targets < 0) | (targets >= self.config.vocab_size))
        n_bad, n_kept = torch.stack([out_of_range.sum(), kept.sum()]).tolist()
        if n_bad:
            raise ValueError(f"targets holds {n_bad} ids outside 0 … {self.config.vocab_size - 1} (and not -100, "
                             f"the ignored position): e.g. {targets[out_of_range][:5].tolist()}")
        if n_kept == 0:
            raise ValueError("targets marks every position -100 (ignored), so there is nothing to learn from and the "
                             "mean loss would be NaN; give at least one target")

    @staticmethod
    def _check_mask(mask: torch.Tensor | None, B: int, T: int, device: torch.device) -> torch.Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a (B, T) tensor of 1s and 0s, got {type(mask).__name__}")
        if mask.shape != (B, T):
            raise ValueError(f"attention_mask must have shape {(B, T)} like the input, got {tuple(mask.shape)}")
        valid = mask.to(device=device).bool()
        if not _may_read_values(valid):  # `valid.all()` would be a host sync: keep the mask, same result
            return valid
        if mask.dtype == torch.bool:
            return None if bool(valid.all()) else valid
        binary, all_valid = torch.stack([((mask == 0) | (mask == 1)).all(), valid.all()]).tolist()  # one sync
        if not binary:
            odd = mask[(mask != 0) & (mask != 1)]
            raise ValueError(f"attention_mask must hold only 1 (a real token) and 0 (padding), or be bool; got "
                             f"{odd.numel()} other values, e.g. {odd[:3].tolist()}")
        return None if all_valid else valid

    @staticmethod
    def _attention_mask(
        valid: torch.Tensor | None, cache: KVCache | None, B: int, T: int, device: torch.device
    ) -> torch.Tensor | None:
        """Boolean (B, 1, T, L+T) mask, True where a query may attend; None means plain causal.

        New tokens see every valid cached entry (the prefix, earlier tokens) and, among themselves, the
        earlier valid ones. Each query also sees itself, so a padded query has one key and no NaN row.
        """
        if valid is None and (cache is None or cache.length == 0):
            return None
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
        new = causal[None] if valid is None else causal[None] & valid[:, None, :]  # (B|1, T, T)
        new = new | torch.eye(T, dtype=torch.bool, device=device)
        new = new.expand(B, T, T)
        if cache is not None and cache.length:
            old = cache.valid[:, None, :].expand(B, T, cache.length)  # (B, T, L)
            new = torch.cat([old, new], dim=2)  # (B, T, L+T)
        return new[:, None]  # (B, 1, T, L+T): broadcast over heads

    # --------------------------------------------------------------- generation
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
        kv_cache: KVCache | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens) ids.

        Greedy by default; `do_sample=True` samples from softmax(logits / temperature), optionally kept to
        the top_k tokens. Batches are left-padded (attention_mask 0 on the left). A KV cache makes each
        step cost one token's work. After `eos_token_id`, a row keeps emitting eos.

        kv_cache: a cache to start from (prefix tuning passes its prefixes here).
        prompt_embeds: (n, C) or (B, n, C) embeddings put in front of idx's at the first step (prompt
        tuning); they take positions 0 … n−1 and are not part of the returned ids.
        prompt_mask: (B, n) bool, which of them each row has (as in forward).
        """
        _check_generate_args(max_new_tokens, do_sample, temperature, top_k, eos_token_id, self.config.vocab_size)
        idx = self._check_idx(idx)
        if attention_mask is not None:
            self._check_mask(attention_mask, *idx.shape, idx.device)
            mask = attention_mask.to(idx.device).bool()
            right_padded = (mask[:, :-1] & ~mask[:, 1:]).any(dim=1) | ~mask[:, -1]  # a 0 after a 1, or at the end
            if right_padded.any():
                rows = right_padded.nonzero().flatten().tolist()
                raise ValueError(f"generate expects left padding (0s only at the start of a row: new tokens follow "
                                 f"the last real one), but attention_mask rows {rows[:5]} have padding after a real "
                                 "token; pad on the left")
        B, T = idx.shape
        self._check_cache(kv_cache, B)
        if prompt_embeds is not None:
            self._check_embeds("prompt_embeds", prompt_embeds, (2, 3),
                               f"(n, {self.config.n_embd}) or (B, n, {self.config.n_embd})")
        n_prompt = 0 if prompt_embeds is None else prompt_embeds.shape[-2]
        n_cache = 0 if kv_cache is None else int(kv_cache.seen.max())
        self.check_length(n_cache + n_prompt + T + max_new_tokens,
                          detail=f"{n_cache} cached + {n_prompt} virtual + {T} prompt + {max_new_tokens} new tokens")
        cache = kv_cache if kv_cache is not None else KVCache(self.config.n_layer, B, device=idx.device)
        mask = attention_mask if attention_mask is not None else torch.ones_like(idx)
        logits, _ = self(idx, attention_mask=mask, kv_cache=cache, prompt_embeds=prompt_embeds,
                         prompt_mask=prompt_mask, logits_to_keep=1)  # (B, 1, vocab): the prompt's last position

        out = idx
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for step in range(max_new_tokens):
            next_logits = logits[:, -1, :].float()  # (B, vocab)
            nxt = self._pick(next_logits, do_sample, temperature, top_k, generator)  # (B,)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if step + 1 < max_new_tokens:
                logits, _ = self(nxt[:, None], kv_cache=cache)
        return out

    @staticmethod
    def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, generator):
        if not do_sample:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = F.softmax(logits, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)

    # ---------------------------------------------------------- GPT-2 checkpoints
    _CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json + model.safetensors in transformers' GPT-2 layout (atomically).

        The files load back with `GPT.from_pretrained` and with transformers' `GPT2LMHeadModel`. A tied
        lm_head is not stored (GPT-2's `tie_word_embeddings`); one that no longer shares the embedding's tensor
        (`merge_and_unload` of a LoRA on lm_head unties it) is stored, with `tie_word_embeddings: false`. The
        Conv1D projections are stored (in, out), as GPT-2 does. An earlier sharded save in the same directory
        (model.safetensors.index.json and the shards it lists) is removed once the new file is in place: the
        index would otherwise win over the new file when the directory is loaded.

        The two files are one save: each is written atomically, the weights first, and the weights' metadata
        records the config fields they were written with (`_PAIRED_KEYS`), so a save killed between the two
        files (new weights beside the old config.json) is refused by `from_pretrained` instead of loading the
        weights under another config. A tensor holding NaN or inf is refused before anything is written.
        """
        if not self.config.bias:
            raise ValueError("save_pretrained writes GPT-2's format, which has biases; this model has bias=False")
        c = self.config
        with torch.device("meta"):  # a plain GPT's keys, without allocating its weights
            plain = set(GPT(c).state_dict())
        keys = set(self.state_dict())
        if keys != plain:
            extra, missing = sorted(keys - plain), sorted(plain - keys)
            raise ValueError(f"save_pretrained: this GPT is not a plain GPT-2 any more (tensors it should not have: "
                             f"{extra[:3]}; tensors it lacks: {missing[:3]}): adapters are injected or layers are "
                             "quantized. Save adapters with PeftModel.save_pretrained / save_adapter, or call "
                             "merge_and_unload() / unload() first")
        tied = self.lm_head.weight is self.transformer.wte.weight
        tensors = {}
        for key, value in self.state_dict().items():
            if key == "lm_head.weight" and tied:
                continue
            n_bad = int((~torch.isfinite(value)).sum()) if value.is_floating_point() else 0
            if n_bad:  # written, it would be a checkpoint that from_pretrained refuses
                raise ValueError(f"save_pretrained: tensor {key!r} holds {n_bad} NaN or inf values (of "
                                 f"{value.numel()}); nothing was written")
            tensors[key] = value.t() if key.endswith(self._CONV1D) else value
        config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_positions": c.block_size,
                  "n_ctx": c.block_size, "vocab_size": c.vocab_size, "n_layer": c.n_layer, "n_head": c.n_head,
                  "n_embd": c.n_embd, "layer_norm_epsilon": c.layer_norm_epsilon,
                  "activation_function": "gelu_new", "resid_pdrop": c.dropout, "embd_pdrop": c.dropout,
                  "attn_pdrop": c.dropout, "tie_word_embeddings": tied}
        saved_with = json.dumps({k: config[k] for k in _PAIRED_KEYS}, sort_keys=True)
        directory = Path(directory)
        save_safetensors(tensors, directory / "model.safetensors", metadata={"format": "pt", _PAIRED_KEY: saved_with})
        _remove_stale_shards(directory)
        save_json(config, directory / "config.json")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> GPT:
        """Load a local GPT-2 directory written by transformers' `GPT2LMHeadModel.save_pretrained`.

        Reads config.json and model.safetensors (or, for a sharded checkpoint, the files that
        model.safetensors.index.json lists); never a pickle. GPT-2 stores its projections as Conv1D with weight
        (in, out), so those four are transposed into nn.Linear's (out, in); every shape is checked before
        copying. With `tie_word_embeddings: false` the checkpoint's own lm_head.weight is loaded into an untied
        head; otherwise the head is the token embedding.

        Raises ValueError, naming the file, for a checkpoint that cannot be loaded as it is: a config.json that
        is not a JSON object, lacks one of `_GPT2_REQUIRED_KEYS` or holds a value GPTConfig refuses (a NaN
        layer_norm_epsilon, a string n_embd); a weight file that is not valid safetensors (a truncated copy,
        say); a tensor that is missing, of another shape, not floating point, or holding NaN or inf (loaded
        silently, one NaN makes every logit NaN); a tensor the model has no place for (a layer past n_layer, an
        lm_head.weight other than the embedding under tie_word_embeddings: true), GPT-2's attn.bias /
        attn.masked_bias mask buffers aside; weights that `save_pretrained` wrote with another config.json.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"from_pretrained directory {str(directory)!r} does not exist or is not a directory")
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise ValueError(f"from_pretrained directory {str(directory)!r} has no config.json: not a GPT-2 checkpoint")
        hf = _read_json_object(config_path)
        if hf.get("model_type") != "gpt2":
            raise ValueError(
                f"from_pretrained expects a GPT-2 checkpoint (model_type 'gpt2'), got model_type "
                f"{hf.get('model_type')!r} in {config_path}"
            )
        missing = [key for key in _GPT2_REQUIRED_KEYS if key not in hf]
        if missing:
            raise ValueError(f"from_pretrained: {config_path} lacks {missing}, which every GPT-2 config.json has "
                             f"(required: {list(_GPT2_REQUIRED_KEYS)})")
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"from_pretrained supports GPT-2's tanh GELU, got activation_function {act!r}")
        # GPT-2 options this GPT does not implement: refused, never silently computed another way
        for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
            if hf.get(key, supported) != supported:
                raise ValueError(f"from_pretrained supports {key}={supported} (GPT-2's attention), got "
                                 f"{hf[key]!r} in {config_path}")
        rates = {k: hf.get(k, hf.get("resid_pdrop", 0.0)) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
        for key, rate in rates.items():  # JSON allows NaN; "0.1" is a string, not a rate
            if isinstance(rate, bool) or not isinstance(rate, int | float) or not _is_finite(rate):
                raise ValueError(f"from_pretrained: {key} must be a finite number, got {_show(rate)} in {config_path}")
        if len(set(rates.values())) > 1:
            raise ValueError(f"from_pretrained needs one dropout rate (minipeft's GPT has one), got {rates} in "
                             f"{config_path}")
        try:
            config = GPTConfig(
                block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True, dropout=float(rates["resid_pdrop"]),
                layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"from_pretrained: {config_path} does not describe a valid GPT: {e} (GPTConfig's "
                             "block_size is n_positions there, dropout is resid_pdrop)") from None
        tied = hf.get("tie_word_embeddings", True)
        if not isinstance(tied, bool):
            raise ValueError(f"from_pretrained: tie_word_embeddings must be true or false, got {tied!r} in "
                             f"{config_path}")
        sd_hf: dict[str, torch.Tensor] = {}
        source: dict[str, Path] = {}  # which file each tensor came from, for the messages
        for f in _safetensors_files(directory):
            try:
                tensors = load_file(str(f))
                with safe_open(str(f), "pt") as opened:
                    metadata = opened.metadata() or {}
            except SafetensorError as e:
                raise ValueError(f"from_pretrained: {f} is not a valid safetensors file (truncated or corrupted?): "
                                 f"{e}") from None
            _check_paired(metadata.get(_PAIRED_KEY), hf, f, config_path)
            for k, v in tensors.items():
                k = k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k
                sd_hf[k], source[k] = v, f

        model = cls(config)
        if not tied:  # a head of its own, filled from the checkpoint below
            model.lm_head.weight = nn.Parameter(torch.empty_like(model.transformer.wte.weight))
        sd = model.state_dict()
        # GPT-2's causal-mask buffers (attn.bias, attn.masked_bias: older transformers saved them) are not weights
        buffers = {f"transformer.h.{i}.attn.{b}" for i in range(config.n_layer) for b in ("bias", "masked_bias")}
        expected = set(sd) - ({"lm_head.weight"} if tied else set())  # a tied head is the embedding, not stored
        unexpected = sorted(set(sd_hf) - expected - buffers)
        if tied and "lm_head.weight" in sd_hf:  # a stored copy of the tied head must be the embedding itself
            wte = sd_hf.get("transformer.wte.weight")
            if wte is not None and sd_hf["lm_head.weight"].shape == wte.shape and \
                    torch.equal(sd_hf["lm_head.weight"], wte):
                unexpected.remove("lm_head.weight")
            else:
                raise ValueError(f"from_pretrained: {source['lm_head.weight']} holds an lm_head.weight that is not "
                                 f"transformer.wte.weight, but {config_path} says tie_word_embeddings: true (the head "
                                 "is the embedding); loading would drop that head. Set tie_word_embeddings to false "
                                 "to load it as an untied head")
        if unexpected:
            raise ValueError(f"from_pretrained: the checkpoint in {str(directory)!r} holds {len(unexpected)} tensors "
                             f"this GPT has no place for (e.g. {unexpected[:3]}, from {source[unexpected[0]]}); "
                             f"{config_path} describes n_layer={config.n_layer}, tie_word_embeddings={tied}: "
                             "does it belong to these weights?")
        for key, target in sd.items():
            if key == "lm_head.weight" and tied:
                continue  # tied to transformer.wte.weight
            if key not in sd_hf:
                raise ValueError(f"from_pretrained: checkpoint in {str(directory)!r} is missing tensor {key!r}")
            src = sd_hf[key]
            if key.endswith(cls._CONV1D):
                src = src.t()
            if src.shape != target.shape:
                raise ValueError(f"from_pretrained: tensor {key!r} in {source[key]} has shape {tuple(src.shape)}, "
                                 f"expected {tuple(target.shape)}")
            if not src.is_floating_point():  # copy_ would cast integer codes to floats without a word
                raise ValueError(f"from_pretrained: tensor {key!r} in {source[key]} has dtype {src.dtype}, expected "
                                 "a floating dtype")
            if not torch.isfinite(src).all():
                n_bad = int((~torch.isfinite(src)).sum())
                raise ValueError(f"from_pretrained: tensor {key!r} in {source[key]} has {n_bad} NaN or inf values "
                                 f"(of {src.numel()}); a checkpoint must hold finite weights")
            with torch.no_grad():
                target.copy_(src)
        return model


# The keys of a GPT-2 config.json that GPTConfig's sizes come from; transformers' GPT2Config writes them all.
_GPT2_REQUIRED_KEYS = ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd")
# save_pretrained records these config.json fields (those that say what the weights mean) in model.safetensors'
# metadata under _PAIRED_KEY, so that from_pretrained can tell a weights file from another save's config.json.
_PAIRED_KEYS = (*_GPT2_REQUIRED_KEYS, "layer_norm_epsilon", "tie_word_embeddings")
_PAIRED_KEY = "minipeft_config"
_INDEX_NAME = "model.safetensors.index.json"  # a sharded checkpoint's list of files (transformers' name)


def _check_paired(saved: str | None, hf: dict, weights: Path, config_path: Path) -> None:
    """ValueError when the weights file records (save_pretrained) other config fields than config.json holds: the
    two files are not one save's. A file without the record (transformers wrote it) is not checked."""
    if saved is None:
        return
    try:
        recorded = json.loads(saved)
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict):
        raise ValueError(f"from_pretrained: {weights} has metadata {_PAIRED_KEY!r} that is not a JSON object: "
                         f"{saved[:80]!r}")
    diff = {k: (v, hf.get(k)) for k, v in recorded.items() if hf.get(k) != v}
    if diff:
        pairs = ", ".join(f"{k}: weights {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"from_pretrained: {weights} was saved with another config than {config_path} ({pairs}): "
                         "the two files are not one save's (a save was interrupted, or config.json was edited). "
                         "Save the model again")


def _read_json_object(path: Path) -> dict:
    """The JSON object in `path`; a ValueError naming the file where it is not valid JSON or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"from_pretrained: {path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"from_pretrained: {path} must hold a JSON object, got a {type(value).__name__}")
    return value


def _safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory: those a sharded checkpoint's index lists, else
    model.safetensors. Other *.safetensors files beside them (an older save's shards) are never read."""
    index = directory / _INDEX_NAME
    if index.is_file():
        weight_map = _read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"from_pretrained: {index} has no weight_map")
        names = set(weight_map.values())
        odd = [name for name in names if not isinstance(name, str)]
        if odd:
            raise ValueError(f"from_pretrained: {index} maps tensors to {odd[:3]}; expected file names (str)")
        files = [directory / name for name in sorted(names)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"from_pretrained: {index} lists files that are not in {str(directory)!r}: {missing}")
        return files
    single = directory / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"from_pretrained found neither model.safetensors nor {_INDEX_NAME} in "
                         f"{str(directory)!r}; minipeft never unpickles pytorch_model.bin (save with "
                         "safe_serialization=True)")
    return [single]


def _remove_stale_shards(directory: Path) -> None:
    """Delete an earlier sharded save's index from `directory`, then the shards it lists; nothing else.

    `save_pretrained` calls this after the new model.safetensors is in place. `from_pretrained` follows an
    index where there is one, so a stale index would load the old shards instead of the new file. The index
    goes first, in one step (an unlink): before it, readers see the old index with all of its shards; after it,
    the new file, and a crash before the shards are gone leaves only files nothing reads. Only what the index
    lists is deleted, and only plain file names ending in .safetensors (never model.safetensors itself, never a
    path that leads out of `directory`). An index that cannot be read is removed all the same, its shards left
    in place (which files they are is unknown).
    """
    index = directory / _INDEX_NAME
    if not index.is_file():
        return
    try:
        names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, no weight_map, not a dict
        names = set()
        logger.info("save_pretrained: %s was unreadable; removed, the shards it may list are left in place", index)
    index.unlink()
    shards = [directory / name for name in sorted(n for n in names if isinstance(n, str))
              if name == Path(name).name and name.endswith(".safetensors") and name != "model.safetensors"]
    for shard in shards:
        if shard.is_file() or shard.is_symlink():
            shard.unlink(missing_ok=True)
    if shards:
        logger.info("save_pretrained: removed an earlier sharded save from %s: %s and %d shards", directory,
                    _INDEX_NAME, len(shards))


def _may_read_values(t: torch.Tensor) -> bool:
    """Whether a check may read t's values on the host: not while torch.compile traces (a graph break) nor while a
    CUDA graph is being captured on t's device (a GPU→CPU sync ends the capture with an error)."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_generate_args(max_new_tokens, do_sample, temperature, top_k, eos_token_id, vocab_size: int) -> None:
    """generate's scalar arguments: types first (TypeError), then ranges and finiteness (ValueError)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__} {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {type(do_sample).__name__} {do_sample!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__} {temperature!r}")
    if not math.isfinite(temperature) or (do_sample and temperature <= 0):
        raise ValueError(f"temperature must be finite (and > 0 when sampling), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
        raise TypeError(f"top_k must be a positive int or None, got {type(top_k).__name__} {top_k!r}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive int or None, got {top_k}")
    if not do_sample and (temperature != 1.0 or top_k is not None):  # greedy decoding would ignore them
        raise ValueError(f"temperature and top_k shape sampling; with do_sample=False (greedy: the argmax) they do "
                         f"nothing, got temperature={temperature!r}, top_k={top_k!r}; pass do_sample=True, or "
                         "leave them at 1.0 and None")
    if eos_token_id is not None and (isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int)):
        raise TypeError(f"eos_token_id must be None or an int token id, got {type(eos_token_id).__name__} "
                        f"{eos_token_id!r}")
    if eos_token_id is not None and not 0 <= eos_token_id < vocab_size:
        raise ValueError(f"eos_token_id must be None or a token id in 0 … {vocab_size - 1}, got {eos_token_id!r}")


VOCAB_ALIGN = 64     # the vocabulary dimension of the output GEMM, padded to a multiple of this on CUDA (head_logits)
PAD_MIN_ROWS = 256   # ... for at least this many rows of logits (not a decode step's few)


def head_logits(head: nn.Module, x: torch.Tensor, align: int | None = None) -> torch.Tensor:
    """head(x): the logits (…, vocab). The same values; on CUDA, for a bias-free nn.Linear whose vocabulary is
    not a multiple of VOCAB_ALIGN (GPT-2's is 50,257) and at least PAD_MIN_ROWS rows, computed at cuBLAS's
    full speed.

    cuBLAS's Hopper GEMMs load and store tiles with TMA, which needs every row of a matrix to start on a
    16-byte boundary. A row of 50,257 bf16 logits is 100,514 bytes, so that GEMM falls back to an old
    (sm_75) kernel at ~1/5 of the speed: in a GPT-2-small training step on an H200 it took longer than all
    twelve blocks. The weight padded with zero rows to 50,304 (nanoGPT's vocab_size) makes aligned rows; the
    extra logits are cut off again (a view: its rows keep their padded stride). The padded copy of the weight
    (77 MB at GPT-2 size, ~40 µs) is made per call and carries gradients back to the weight; below PAD_MIN_ROWS
    rows (a decode step) the GEMM reads the weight once and the copy would cost more than it saves (from the
    bytes, not measured: the speed-up was measured on 1,335-row chunks and 16,384-row prefills).
    align: pad to a multiple of this whatever the device and rows; None = the rule above (1 = no padding)."""
    if align is None:  # compiled code takes head(x): Inductor's pad_mm pass pads misaligned GEMMs where faster
        rows = x.numel() // max(x.shape[-1], 1)
        big = x.is_cuda and rows >= PAD_MIN_ROWS and not torch.compiler.is_compiling()
        align = VOCAB_ALIGN if big else 1
    if type(head) is not nn.Linear or head.bias is not None or head.out_features % align == 0:
        return head(x)
    weight = head.weight  # (vocab, C)
    device = x.device.type
    if torch.is_autocast_enabled(device) and torch.float64 not in (x.dtype, weight.dtype):
        weight = weight.to(torch.get_autocast_dtype(device))  # cast, then pad: as F.linear would cast
    padded = F.pad(weight, (0, 0, 0, -head.out_features % align))  # (vocab + pad, C): zero rows
    return F.linear(x, padded)[..., :head.out_features]  # (…, vocab)


LOSS_CHUNK_BYTES = 256 * 2**20  # fp32 logits per chunk: 256 MiB is 1,335 rows of GPT-2's 50,257-word vocabulary


def chunked_cross_entropy(head: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                          chunk_rows: int | None = None) -> torch.Tensor:
    """mean over targets ≠ −100 of cross_entropy(head(x), targets), never holding all the logits at once.

    x (N, C) are the final hidden states, targets (N,). The logits of N rows are N·vocab fp32 numbers — for a
    GPT-2 batch of 8 × 992 tokens, 1.6 GB, more than the rest of a LoRA step's activations. So the rows go
    through `head` a chunk at a time, each chunk's summed loss under activation checkpointing: the backward
    recomputes that chunk's logits instead of keeping them, and only x and one chunk's logits are ever
    alive. The same idea as Liger-Kernel's fused linear cross-entropy, in plain PyTorch. Each chunk's logits
    come from `head_logits` (on CUDA, the vocabulary padded for cuBLAS's aligned GEMMs).
    """
    if chunk_rows is None:
        chunk_rows = max(1, LOSS_CHUNK_BYTES // (4 * head.out_features))
    total = x.new_zeros((), dtype=torch.float32)
    for xs, ts in zip(x.split(chunk_rows), targets.split(chunk_rows), strict=True):
        total = total + checkpoint(_summed_cross_entropy, head, xs, ts, use_reentrant=False)
    return total / (targets != -100).sum()


def _summed_cross_entropy(head: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ over targets ≠ −100 of logsumexp(z) − z[target], z = head(x) (n, vocab): F.cross_entropy's sum.

    Eagerly, F.cross_entropy itself: its fused kernels beat the written-out sum on the CPU (2.2 against 2.7 s
    for a chunk of 1,335 GPT-2 rows, fp32, forward and backward, the head's GEMMs included). Compiled, the
    written-out sum: with F.cross_entropy, Inductor kept five chunks' fp32 (rows, vocab) buffers (256 MiB each
    at LOSS_CHUNK_BYTES) and their 16-bit logits alive at once in the forward of a GPT-2-small step on an H200,
    1.9 GiB of its 4.5 GiB peak. Written out, the cast to fp32 fuses into the logsumexp and the gather, which
    read the 16-bit logits, and the step's peak fell to 3.1 GiB, one chunk's logits at a time
    (benchmarks/RESULTS.md)."""
    # head_logits pads the weight inside the checkpoint: backward makes the padded copy again instead of keeping it.
    logits = head_logits(head, x).float()  # (n, vocab)
    if not torch.compiler.is_compiling():
        return F.cross_entropy(logits, targets.long(), ignore_index=-100, reduction="sum")
    keep = targets != -100  # (n,)
    picked = logits.gather(1, torch.where(keep, targets, 0).long()[:, None])[:, 0]  # (n,): z[target]
    return torch.where(keep, torch.logsumexp(logits, dim=1) - picked, 0.0).sum()
