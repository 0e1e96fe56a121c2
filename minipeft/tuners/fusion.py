"""AdapterFusion: per adapted sublayer, a learned attention over the outputs of frozen task adapters.

Pfeiffer et al. 2021 (https://arxiv.org/abs/2005.00247) learn a new task in two stages: first one adapter
per task, each alone (knowledge extraction); then, with those adapters and the base frozen, a small attention
in every adapted sublayer that decides, token by token, how much of each adapter's output to use
(knowledge composition). The fusion layer is the only thing trained in the second stage.

At a sublayer with output o (B, T, d) and N fused bottleneck adapters with updates δᵢ(o) = upᵢ(f(downᵢ(o)))
(each adapter's output without its residual, bottleneck.py), following the `adapters` library's BertFusion:

    q  = W_Q·o + b_Q                       (B, T, d)      the query: the sublayer output
    kᵢ = W_K·δᵢ + b_K,  vᵢ = W_V·δᵢ        (B, T, N, d)   keys and values: the adapters' updates
    sᵢ = q · kᵢ                             (B, T, N)      no 1/√d scaling (the library has none)
    p  = softmax(dropout(s))  over the N adapters, per token
    out = o + Σᵢ pᵢ·vᵢ                      (B, T, d)      the residual is o, added after the attention

         o ───────────────────────────────────────────────────────────┐
         │                                                            │
         ├──► W_Q ──► q ─┐                                            ▼
         ├──► adapter 1 ──► δ₁ ──► W_K ──► k₁ ─┐                      (+) ──► out
         │                   └───► W_V ──► v₁ ──┤ softmax(q·k) · v ───┘
         └──► adapter N ──► δ_N ─► W_K, W_V ───┘

Details, as the library's default ("dynamic") AdapterFusionConfig has them:
- init: W_Q, W_K ~ N(0, 0.02²) with zero biases (BERT's init); W_V = the identity, without a bias (the library
  adds 1e-6 off the diagonal, which changes nothing a test could see; minipeft uses the exact identity). So at
  the start the scores are near 0, p ≈ 1/N and out ≈ o + (1/N)·Σᵢ δᵢ: close to the uniform Average of the
  adapters, a sensible place to start from. (Exactly uniform would need W_Q or W_K = 0; the library does not
  do that, and neither does minipeft.)
- dropout acts on the scores before the softmax (the library's `attention_probs_dropout_prob`, BERT's 0.1);
  minipeft's default is the base's `GPTConfig.dropout`.
- "static" fusion has no W_V: out = o + Σᵢ pᵢ·δᵢ.
- the library's temperature schedule (T from 50 down to 1) is off in both its configs; it is not implemented.
- regularisation: the library adds 0.01·Σ‖W_V − I‖²_F over the fusion layers to the loss of dynamic fusion,
  so that V stays near the identity; `PeftModel.fusion_regularization_loss()` returns that term (add it to
  your loss when you train a fusion).
- where the query comes from: the library's post-LN BERT takes the sublayer's hidden state after its residual
  add and LayerNorm as the query and the sublayer output as the residual; in minipeft's pre-LN GPT the
  adapters act on o before the residual add (bottleneck.py), so o is both.

Parameters per adapted sublayer: Q and K with biases, V without: **3·d² + 2·d** (static: 2·d² + 2·d), whatever
N is. Worked example: d = 768 → 1,771,008 per sublayer, 21.3M for GPT-2 small's 12 Pfeiffer sites; d = 32 →
3,136. A fusion is far larger than the adapters it combines (74,544 each at d = 768, rf = 16).

The attention p of the last forward pass is kept (detached) as `last_attention` (B, T, N), in the fused
adapters' order, for plots (`PeftModel.fusion_attention`); under torch.compile it is not recorded.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["AdapterFusion", "FUSION_TYPES"]

FUSION_TYPES = ("dynamic", "static")  # the library's two AdapterFusionConfigs: with and without W_V


class AdapterFusion(nn.Module):
    """out = o + Σᵢ softmax_i(dropout(W_Q o · W_K δᵢ))·W_V δᵢ (see the module docstring).

    Args:
        d: the hidden size (n_embd).
        fusion_type: "dynamic" (query, key and value matrices) or "static" (no value matrix).
        dropout: the dropout probability on the attention scores.
    """

    def __init__(self, d: int, fusion_type: str = "dynamic", dropout: float = 0.0,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if fusion_type not in FUSION_TYPES:
            raise ValueError(f"fusion_type must be one of {FUSION_TYPES}, got {fusion_type!r}")
        self.fusion_query = nn.Linear(d, d, device=device, dtype=dtype)  # (d, d) + (d,)
        self.fusion_key = nn.Linear(d, d, device=device, dtype=dtype)  # (d, d) + (d,)
        self.fusion_value = nn.Linear(d, d, bias=False, device=device, dtype=dtype) if fusion_type == "dynamic" \
            else None  # (d, d)
        self.fusion_dropout = nn.Dropout(dropout)
        self.last_attention: torch.Tensor | None = None
        with torch.no_grad():  # the library's init (module docstring)
            for linear in (self.fusion_query, self.fusion_key):
                linear.weight.normal_(mean=0.0, std=0.02)
                linear.bias.zero_()
            if self.fusion_value is not None:
                self.fusion_value.weight.copy_(torch.eye(d))

    @property
    def fusion_type(self) -> str:
        return "static" if self.fusion_value is None else "dynamic"

    def forward(self, o: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """o (B, T, d) the sublayer output; deltas (B, T, N, d) the adapters' updates δᵢ(o) → (B, T, d)."""
        q = self.fusion_query(o)  # (B, T, d)
        k = self.fusion_key(deltas)  # (B, T, N, d)
        v = deltas if self.fusion_value is None else self.fusion_value(deltas)  # (B, T, N, d)
        scores = (k @ q.unsqueeze(-1)).squeeze(-1)  # (B, T, N, d) @ (B, T, d, 1) → (B, T, N)
        p = torch.softmax(self.fusion_dropout(scores), dim=-1)  # (B, T, N)
        if not torch.compiler.is_compiling():
            self.last_attention = p.detach()
        return o + (p.unsqueeze(-2) @ v).squeeze(-2)  # (B, T, 1, N) @ (B, T, N, d) → (B, T, d)

    def extra_repr(self) -> str:
        return f"fusion_type={self.fusion_type!r}"
