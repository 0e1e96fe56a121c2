"""Worked solutions to the exercises of the prompt-tuning chapter (notebooks/06_prompt_tuning.ipynb).

Each solution is followed, in ``main``, by the check the chapter's check cell makes. Run from notebooks/:

    python solutions/06_prompt_tuning.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # notebooks/, for `checks`

from checks.ch06 import check_prepend_soft_prompt, check_ptuning_mlp_params, check_text_init  # noqa: E402


# Exercise 1 — prepending the soft prompt to the embeddings, and to the mask.
def prepend_soft_prompt(P: torch.Tensor, tok_emb: torch.Tensor,
                        attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[P ; tok_emb] and [1…1 ; attention_mask].

    The same prompt serves every row, so P (n, C) is expanded (a view, no copy) to (B, n, C) and concatenated in
    front of the tokens along the sequence dimension. The virtual tokens are never padding: their mask columns
    are 1; the real tokens keep their own mask.
    """
    B = tok_emb.shape[0]
    n = P.shape[0]
    x = torch.cat([P[None].expand(B, -1, -1), tok_emb], dim=1)  # (B, n+T, C)
    ones = torch.ones(B, n, dtype=attention_mask.dtype)  # (B, n)
    return x, torch.cat([ones, attention_mask], dim=1)  # (B, n+T)


# Exercise 2 — the parameter count of P-tuning's MLP encoder.
def ptuning_mlp_params(n: int, C: int, H: int) -> int:
    """n seeds (n·C), then Linear(C, H), Linear(H, H), Linear(H, C), each weight plus bias (HF peft's layout)."""
    return n * C + (C * H + H) + (H * H + H) + (H * C + C)


# Exercise 3 — initialising a soft prompt from vocabulary embeddings.
def text_init(wte: torch.Tensor, ids: list[int], n: int) -> torch.Tensor:
    """wte (V, C), the init text's token ids → (n, C): row i is wte[ids[i mod len(ids)]].

    Repeating ⌈n / len(ids)⌉ times and cutting to n covers both cases: a text shorter than n is cycled, a longer
    one is cut. The rows are copied (clone) so that training the prompt never writes into the embedding table.
    """
    reps = -(-n // len(ids))  # ⌈n / len(ids)⌉
    chosen = torch.tensor((ids * reps)[:n])  # (n,)
    return wte[chosen].clone()  # (n, C)


def main() -> None:
    check_prepend_soft_prompt(prepend_soft_prompt)
    check_ptuning_mlp_params(ptuning_mlp_params)
    check_text_init(text_init)


if __name__ == "__main__":
    main()
