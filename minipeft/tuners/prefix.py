"""Prefix tuning: n learned key/value pairs in front of every layer's attention, the base model frozen.

Instead of changing any weight, prefix tuning gives each of the L attention layers n extra "virtual" keys
and values that every real token can attend to. In layer l, head h, a real token at step t attends to

    softmax( q_t · [P_kˡ ; K_{≤t}]ᵀ / √hs ) · [P_vˡ ; V_{≤t}]          P_kˡ, P_vˡ: (nh, n, hs), learned

so the prefix steers every layer's computation like n invisible tokens of context would, but each
pair is free (not tied to any word's activations). The causal mask applies only among the real tokens;
the prefix is visible to all of them, and the real tokens take positions n … n+T−1 (as HF peft does
on GPT-2). Generation with a KV cache puts the prefix into the cache once: the cache starts as the prefix.

    Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
    https://arxiv.org/abs/2101.00190

Re-parametrisation (`prefix_projection=True`, the paper's §4.3): training the prefix directly is
unstable, so an MLP produces it from n smaller embeddings,

    P = W₂ · tanh(W₁ · E + b₁) + b₂          E: (n, C) → (n, H) → (n, L·2·C)

and after training the MLP is dropped: `fold()` evaluates it once and keeps only P (outputs identical).

Layout of the flat prefix P (n, L·2·C), the same as HF peft's `PrefixEncoder` output and the
`prompt_embeddings` tensor of its prefix-tuning files, so that io.py can load them directly. Row i is
virtual token i; its L·2·C columns are, in order, layer 0's key, layer 0's value, layer 1's key, …, and
each C-wide block is nh heads of hs numbers (head-major, like `c_attn`'s output). peft reshapes it as
view(B, n, 2L, nh, hs).permute(2, 0, 3, 1, 4) → (2L, B, nh, n, hs) and splits it into L pairs (2, B, nh, n, hs);
`prepare()` below does the same without the batch dimension.

Trainable parameters (the closed forms the tests check; C = n_embd, H = encoder_hidden_size or C):
    plain:            L·2·n·C                                    (`prefix_embeddings`)
    with projection:  n·C + (C·H + H) + (H·L·2·C + L·2·C)        (`prefix_tokens`, `prefix_mlp`)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minipeft.model import GPT, KVCache
from minipeft.tuners.config import PrefixTuningConfig
from minipeft.tuners.input_adapter import VirtualTokens

__all__ = ["PrefixEncoder", "create_input_adapter", "real_token_init"]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class PrefixEncoder(nn.Module):
    """Per-layer learned key/value prefixes for a GPT (an input adapter: see minipeft/tuners/input_adapter.py).

    Args:
        num_virtual_tokens: n, the prefix length (n < block_size, so at least one real token fits).
        n_layer, n_head, n_embd: the base model's L, nh and C.
        prefix_projection: produce the prefix with Embedding(n, C) → Linear(C, H) → Tanh → Linear(H, L·2·C).
        encoder_hidden_size: H for the projection (default C).
        init: the plain prefix's initial value, a (n, L·2·C) tensor (see `create_input_adapter`); None draws
            N(0, 1) as HF peft's nn.Embedding does. Ignored with the projection (peft's init: the embedding
            N(0, 1), the Linears PyTorch's default; the tanh and the last Linear keep the output O(1)).

    Raises:
        ValueError: a size that is not a positive int, or an init of the wrong shape.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        n_layer: int,
        n_head: int,
        n_embd: int,
        prefix_projection: bool = False,
        encoder_hidden_size: int | None = None,
        init: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_virtual_tokens", num_virtual_tokens), ("n_layer", n_layer),
                            ("n_head", n_head), ("n_embd", n_embd)):
            _check_positive_int(name, value)
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.num_virtual_tokens = num_virtual_tokens
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.prefix_projection = bool(prefix_projection)
        flat_width = n_layer * 2 * n_embd  # L·2·C: every layer's key and value for one virtual token
        if self.prefix_projection:
            hidden = n_embd if encoder_hidden_size is None else _check_positive_int("encoder_hidden_size",
                                                                                     encoder_hidden_size)
            self.encoder_hidden_size = hidden
            self.prefix_tokens = nn.Parameter(torch.randn(num_virtual_tokens, n_embd))  # (n, C)
            self.prefix_mlp = nn.Sequential(
                nn.Linear(n_embd, hidden),  # (n, C) → (n, H)
                nn.Tanh(),
                nn.Linear(hidden, flat_width),  # (n, H) → (n, L·2·C)
            )
        else:
            self.encoder_hidden_size = None
            if init is None:
                init = torch.randn(num_virtual_tokens, flat_width)
            if tuple(init.shape) != (num_virtual_tokens, flat_width):
                raise ValueError(f"init must have shape (num_virtual_tokens, n_layer·2·n_embd) = "
                                 f"{(num_virtual_tokens, flat_width)}, got {tuple(init.shape)}")
            self.prefix_embeddings = nn.Parameter(init.detach().clone().float())  # (n, L·2·C)

    # ------------------------------------------------------------------ the prefix
    def flat_prefix(self) -> torch.Tensor:
        """The prefix P (n, L·2·C) in HF peft's layout (see the module docstring); differentiable."""
        if self.prefix_projection:
            return self.prefix_mlp(self.prefix_tokens)  # (n, C) → (n, L·2·C)
        return self.prefix_embeddings

    def keys_values(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer prefix keys and values, each (nh, n, hs), with no batch dimension."""
        n, L, nh = self.num_virtual_tokens, self.n_layer, self.n_head
        hs = self.n_embd // nh
        kv = self.flat_prefix().view(n, 2 * L, nh, hs).permute(1, 2, 0, 3)  # (2L, nh, n, hs)
        return [kv[2 * layer] for layer in range(L)], [kv[2 * layer + 1] for layer in range(L)]

    def prepare(self, model: GPT, batch_size: int) -> VirtualTokens:
        """{"kv_cache": a fresh KVCache holding the prefix for a batch of `batch_size`}, for GPT.forward /
        GPT.generate (the input-adapter protocol).

        The cache's prefix entries are all valid, so every real token sees all of them; GPT's own mask keeps
        attention causal among the real tokens, and `seen = n` starts their positions at n.
        """
        self._check_model(model)
        B = batch_size
        keys, values = self.keys_values()
        dtype = model.transformer.wte.weight.dtype
        keys = [k.to(dtype)[None].expand(B, -1, -1, -1) for k in keys]  # (B, nh, n, hs) per layer
        values = [v.to(dtype)[None].expand(B, -1, -1, -1) for v in values]
        return {"kv_cache": KVCache.from_prefix(keys, values)}

    def _check_model(self, model: GPT) -> None:
        c = model.config
        if (c.n_layer, c.n_head, c.n_embd) != (self.n_layer, self.n_head, self.n_embd):
            raise ValueError(f"this prefix was made for n_layer={self.n_layer}, n_head={self.n_head}, "
                             f"n_embd={self.n_embd}; the model has n_layer={c.n_layer}, n_head={c.n_head}, "
                             f"n_embd={c.n_embd}")

    @torch.no_grad()
    def fold(self) -> PrefixEncoder:
        """A plain PrefixEncoder holding this one's prefix P (the MLP evaluated once): identical outputs,
        L·2·n·C parameters, nothing left to compute at inference. A plain encoder folds to a copy of itself."""
        plain = PrefixEncoder(self.num_virtual_tokens, self.n_layer, self.n_head, self.n_embd,
                              prefix_projection=False, init=self.flat_prefix().float())
        return plain.to(self._device())

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def extra_repr(self) -> str:
        return (f"num_virtual_tokens={self.num_virtual_tokens}, n_layer={self.n_layer}, n_head={self.n_head}, "
                f"n_embd={self.n_embd}, prefix_projection={self.prefix_projection}")


@torch.no_grad()
def real_token_init(model: GPT, num_virtual_tokens: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A prefix (n, L·2·C) made of the frozen model's own keys and values for n random vocabulary tokens.

    Li & Liang (§7.4) found that initialising the prefix with the activations of real words works much
    better than random init. It also puts every key and value at the scale the attention was trained on:
    peft's N(0, 1) keys are far larger than a small model's real keys, so its softmax starts saturated on
    the prefix and the gradients to the queries are tiny.
    """
    c = model.config
    ids = torch.randint(0, c.vocab_size, (1, num_virtual_tokens), generator=generator).to(model.device)
    cache = KVCache(c.n_layer, 1, device=model.device)
    was_training = model.training
    model.eval()
    model(ids, kv_cache=cache)  # fills cache.keys[l], cache.values[l]: (1, nh, n, hs)
    model.train(was_training)
    blocks = []
    for k, v in zip(cache.keys, cache.values, strict=True):
        for t in (k, v):
            blocks.append(t[0].permute(1, 0, 2).reshape(num_virtual_tokens, c.n_embd))  # (nh, n, hs) → (n, C)
    return torch.cat(blocks, dim=1).float()  # (n, L·2·C): layer 0 key, layer 0 value, layer 1 key, …


def create_input_adapter(config: PrefixTuningConfig, model: GPT, tokenizer: object = None) -> PrefixEncoder:
    """The PrefixEncoder for `config` on `model` (the tokenizer is not used; `PeftModel` passes one to every
    input method's factory).

    The plain prefix starts as the model's own keys/values of n random tokens (`real_token_init`; it uses
    torch's global RNG, like peft's SAMPLE_VOCAB); the projected one starts as HF peft's does.
    """
    if not isinstance(config, PrefixTuningConfig):
        raise ValueError(f"config must be a PrefixTuningConfig, got {type(config).__name__}")
    c = model.config
    init = None if config.prefix_projection else real_token_init(model, config.num_virtual_tokens)
    encoder = PrefixEncoder(config.num_virtual_tokens, c.n_layer, c.n_head, c.n_embd,
                            prefix_projection=config.prefix_projection,
                            encoder_hidden_size=config.encoder_hidden_size, init=init)
    return encoder.to(model.device)
