"""Soft prompts: prompt tuning and P-tuning learn n virtual-token embeddings put in front of the input.

Prompt tuning keeps the whole model frozen and learns only a matrix P of n "virtual token" embeddings that
are prepended to the embedded input; the model then reads [P ; wte(x)] as if P were words:

    logits = GPT( [P ; wte[x₁] … wte[x_T]] )[n:]          P: (n, C), learned; the only trainable tensor

The virtual tokens take positions 0 … n−1 and the real tokens n … n+T−1 (as HF peft does on GPT-2), so
n + T ≤ block_size; logits and the loss cover the real tokens only.

    Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning",
    https://arxiv.org/abs/2104.08691

Initialisation (`prompt_tuning_init`), as in the paper's §3.2:
    TEXT          the embeddings of an init text's tokens, repeated or cut to n (e.g. the task's instruction);
    SAMPLE_VOCAB  n rows of wte drawn uniformly from the vocabulary;
    RANDOM        N(0, σ²) with σ the standard deviation of wte's entries. HF peft uses N(0, 1) (nn.Embedding's
                  default); a small GPT's token embeddings are far smaller than that (σ ≈ 0.05–0.2), and a
                  prompt 10× larger than any real token swamps the residual stream, so we match wte's scale.

P-tuning re-parametrises P: a small prompt encoder maps n learned seeds to the n virtual tokens, which
couples them (the LSTM sees the whole sequence) and eases optimisation. As in HF peft's PromptEncoder:

    MLP:   P = W₃ · relu(W₂ · relu(W₁ · E + b₁) + b₂) + b₃             E: (n, C) → H → H → C
    LSTM:  P = MLPhead( BiLSTM(E) ),  MLPhead: 2H → 2H → relu → C        E: (n, C) → (n, 2H) → (n, C)

    Liu et al. 2021, "GPT Understands, Too", https://arxiv.org/abs/2103.10385

After training, `nearest_tokens` lists the vocabulary tokens closest (by cosine) to each virtual token,
the paper's way to ask what a soft prompt "says" (often: nothing readable).

Trainable parameters (the closed forms the tests check; C = n_embd, H = encoder_hidden_size, ℓ = layers):
    prompt tuning:      n·C                                                 (`prompt_embeddings`)
    P-tuning, MLP:      n·C + (C·H + H) + (H·H + H) + (H·C + C)             (`prompt_encoder.…`)
    P-tuning, LSTM:     n·C + 2·[4H(C+H) + 8H] + (ℓ−1)·2·[4H(2H+H) + 8H] + (2H·2H + 2H) + (2H·C + C)
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from minipeft.model import GPT
from minipeft.tuners.config import PROMPT_INITS, PromptTuningConfig, PTuningConfig
from minipeft.tuners.input_adapter import VirtualTokens

__all__ = [
    "Neighbor",
    "PromptEmbedding",
    "PromptEncoder",
    "PTuningEmbedding",
    "create_input_adapter",
    "init_prompt_embeddings",
    "nearest_tokens",
]


class Neighbor(NamedTuple):
    """One vocabulary token near a virtual token: its id, its text (when a tokenizer was given), the cosine."""

    token_id: int
    token: str | None
    cosine: float


def _token_text(tokenizer: Any, token_id: int) -> str:
    if hasattr(tokenizer, "token_to_str"):
        return tokenizer.token_to_str(token_id)
    return tokenizer.decode([token_id])


@torch.no_grad()
def nearest_tokens(
    embeddings: torch.Tensor, wte: torch.Tensor, k: int = 5, tokenizer: Any = None
) -> list[list[Neighbor]]:
    """For each row of `embeddings` (n, C), the k rows of `wte` (V, C) with the highest cosine similarity.

    cos(p, e) = p·e / (‖p‖‖e‖). Returns n lists of k `Neighbor`s, best first; `token` is filled when a
    tokenizer (anything with `token_to_str(id)` or `decode([id])`) is given.
    """
    if embeddings.dim() != 2 or wte.dim() != 2 or embeddings.shape[1] != wte.shape[1]:
        raise ValueError(f"embeddings (n, C) and wte (V, C) must share C, got {tuple(embeddings.shape)} and "
                         f"{tuple(wte.shape)}")
    V = wte.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= V:
        raise ValueError(f"k must be an int in [1, {V}] (the vocabulary size), got {k!r}")
    p = F.normalize(embeddings.float(), dim=-1)  # (n, C)
    e = F.normalize(wte.float().to(p.device), dim=-1)  # (V, C)
    scores, ids = (p @ e.T).topk(k, dim=-1)  # (n, k) each
    return [
        [Neighbor(int(i), _token_text(tokenizer, int(i)) if tokenizer is not None else None, float(s))
         for i, s in zip(row_ids.tolist(), row_scores.tolist(), strict=True)]
        for row_ids, row_scores in zip(ids, scores, strict=True)
    ]


class _SoftPrompt(nn.Module, abc.ABC):
    """What prompt tuning and P-tuning share: the input-adapter protocol and `nearest_tokens`."""

    num_virtual_tokens: int

    @abc.abstractmethod
    def virtual_tokens(self) -> torch.Tensor:
        """The n virtual-token embeddings (n, C), differentiable."""

    @abc.abstractmethod
    def fold(self) -> PromptEmbedding:
        """A plain soft prompt with the same virtual tokens (the input-adapter protocol's `fold`)."""

    def prepare(self, model: GPT, batch_size: int) -> VirtualTokens:
        """{"prompt_embeds": (n, C)}: GPT puts them in front of wte(idx) at positions 0 … n−1 (the
        input-adapter protocol; the same prompt serves every row, so `batch_size` is not needed)."""
        prompt = self.virtual_tokens()
        if prompt.shape[-1] != model.config.n_embd:
            raise ValueError(f"this soft prompt has width {prompt.shape[-1]} but the model's n_embd is "
                             f"{model.config.n_embd}")
        return {"prompt_embeds": prompt}

    def nearest_tokens(self, wte: torch.Tensor, k: int = 5, tokenizer: Any = None) -> list[list[Neighbor]]:
        """For each learned virtual token, the k vocabulary tokens nearest by cosine (see `nearest_tokens`).

        wte: the model's token embedding matrix (V, C), e.g. `model.transformer.wte.weight`."""
        return nearest_tokens(self.virtual_tokens().detach(), wte, k, tokenizer)


class PromptEmbedding(_SoftPrompt):
    """Prompt tuning's soft prompt: one trainable (n, C) matrix `prompt_embeddings` (n·C parameters).

    The name and shape match the `prompt_embeddings` tensor of HF peft's prompt-tuning files."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        if init.dim() != 2 or init.shape[0] == 0:
            raise ValueError(f"init must be a non-empty (num_virtual_tokens, n_embd) tensor, got {tuple(init.shape)}")
        self.num_virtual_tokens = init.shape[0]
        self.prompt_embeddings = nn.Parameter(init.detach().clone().float())  # (n, C)

    def virtual_tokens(self) -> torch.Tensor:
        return self.prompt_embeddings  # (n, C)

    @torch.no_grad()
    def fold(self) -> PromptEmbedding:
        """Already plain: a copy of itself."""
        return PromptEmbedding(self.prompt_embeddings).to(self.prompt_embeddings.device)


class PromptEncoder(nn.Module):
    """P-tuning's encoder (HF peft's PromptEncoder architecture): n seeds → MLP or BiLSTM + MLP head → (n, C).

    Args:
        num_virtual_tokens: n.  n_embd: C, the seeds' and the output's width.  hidden_size: H.
        encoder_type: "MLP" (three Linears, encoder_num_layers ignored, as in peft) or "LSTM".
        num_layers: the LSTM's layers.  dropout: between LSTM layers (needs num_layers > 1; ignored by MLP).
    """

    def __init__(self, num_virtual_tokens: int, n_embd: int, hidden_size: int, encoder_type: str = "MLP",
                 num_layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        if encoder_type not in ("MLP", "LSTM"):
            raise ValueError(f"encoder_type must be 'MLP' or 'LSTM', got {encoder_type!r}")
        self.encoder_type = encoder_type
        self.embedding = nn.Embedding(num_virtual_tokens, n_embd)  # the seeds, N(0, 1) as in peft
        if encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(n_embd, hidden_size, num_layers=num_layers, bidirectional=True,
                                     batch_first=True, dropout=dropout if num_layers > 1 else 0.0)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden_size, 2 * hidden_size), nn.ReLU(),
                                          nn.Linear(2 * hidden_size, n_embd))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(n_embd, hidden_size), nn.ReLU(),
                                          nn.Linear(hidden_size, hidden_size), nn.ReLU(),
                                          nn.Linear(hidden_size, n_embd))

    def forward(self) -> torch.Tensor:
        seeds = self.embedding.weight  # (n, C)
        if self.encoder_type == "LSTM":
            h, _ = self.lstm_head(seeds[None])  # (1, n, 2H): both directions, concatenated
            return self.mlp_head(h[0])  # (n, C)
        return self.mlp_head(seeds)  # (n, C)


class PTuningEmbedding(_SoftPrompt):
    """P-tuning's input adapter: the virtual tokens are `prompt_encoder()`'s output, recomputed each call."""

    def __init__(self, num_virtual_tokens: int, n_embd: int, hidden_size: int, encoder_type: str = "MLP",
                 num_layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.prompt_encoder = PromptEncoder(num_virtual_tokens, n_embd, hidden_size, encoder_type, num_layers,
                                            dropout)

    def virtual_tokens(self) -> torch.Tensor:
        return self.prompt_encoder()  # (n, C)

    @torch.no_grad()
    def fold(self) -> PromptEmbedding:
        """A plain soft prompt holding the encoder's current output: identical outputs, n·C parameters."""
        return PromptEmbedding(self.virtual_tokens().float()).to(self.prompt_encoder.embedding.weight.device)


@torch.no_grad()
def init_prompt_embeddings(
    wte: torch.Tensor, num_virtual_tokens: int, init: str = "RANDOM", init_text: str | None = None,
    tokenizer: Any = None, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The initial soft prompt (n, C) for `init` in ("TEXT", "RANDOM", "SAMPLE_VOCAB"), from wte (V, C).

    TEXT: the init text's token embeddings, repeated (then cut) when the text is shorter than n, cut when
    longer. SAMPLE_VOCAB: n rows of wte drawn uniformly. RANDOM: N(0, σ²), σ = wte.std() (see the module
    docstring for why not peft's N(0, 1)). Random draws use `generator`, else torch's global RNG.
    """
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens <= 0:
        raise ValueError(f"num_virtual_tokens must be a positive int, got {num_virtual_tokens!r}")
    V, C = wte.shape
    n = num_virtual_tokens
    if init == "TEXT":
        if not init_text:
            raise ValueError("prompt_tuning_init_text is required when prompt_tuning_init='TEXT', got "
                             f"{init_text!r}")
        if tokenizer is None:
            raise ValueError("prompt_tuning_init='TEXT' needs a tokenizer to encode prompt_tuning_init_text: pass "
                             "tokenizer= to get_peft_model / add_adapter (it is used once and never saved)")
        ids = list(tokenizer.encode(init_text))
        if not ids:
            raise ValueError(f"prompt_tuning_init_text {init_text!r} encodes to no tokens")
        if min(ids) < 0 or max(ids) >= V:
            raise ValueError(f"prompt_tuning_init_text encodes to token ids up to {max(ids)}, outside the model's "
                             f"vocabulary 0 … {V - 1}: is the tokenizer the model's?")
        ids = (ids * (-(-n // len(ids))))[:n]  # repeat ⌈n/len⌉ times, then cut to n
        return wte[torch.tensor(ids, device=wte.device)].float().clone()  # (n, C)
    if init == "SAMPLE_VOCAB":
        ids = torch.randint(0, V, (n,), generator=generator)
        return wte[ids.to(wte.device)].float().clone()  # (n, C)
    if init == "RANDOM":
        sigma = float(wte.float().std())
        return torch.randn(n, C, generator=generator).to(wte.device) * sigma  # (n, C)
    raise ValueError(f"prompt_tuning_init must be one of {PROMPT_INITS}, got {init!r}")


def create_input_adapter(
    config: PromptTuningConfig | PTuningConfig, model: GPT, tokenizer: Any = None
) -> PromptEmbedding | PTuningEmbedding:
    """The input adapter for a PromptTuningConfig (PromptEmbedding) or a PTuningConfig (PTuningEmbedding).

    `tokenizer` (or, when it is None, the config's own `tokenizer` field) encodes the TEXT init's text;
    it is used here and never stored. Random inits draw from torch's global RNG, as peft does.
    """
    if not isinstance(config, (PromptTuningConfig, PTuningConfig)):
        raise ValueError(f"config must be a PromptTuningConfig or a PTuningConfig, got {type(config).__name__}")
    c = model.config
    n = config.num_virtual_tokens
    if isinstance(config, PTuningConfig):
        adapter: nn.Module = PTuningEmbedding(n, c.n_embd, config.encoder_hidden_size,
                                              config.encoder_reparameterization_type, config.encoder_num_layers,
                                              config.encoder_dropout)
    else:
        wte = model.transformer.wte.weight
        tokenizer = tokenizer if tokenizer is not None else config.tokenizer
        adapter = PromptEmbedding(init_prompt_embeddings(wte, n, config.prompt_tuning_init,
                                                         config.prompt_tuning_init_text, tokenizer))
    return adapter.to(model.device)
