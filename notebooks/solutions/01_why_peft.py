"""Worked solutions to the exercises of chapter 1 (notebooks/01_why_peft.ipynb): meet the world; why PEFT.

Each solution is followed, in ``main``, by the check the chapter's check cell makes. Run from notebooks/:

    python solutions/01_why_peft.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # notebooks/, for `checks`

from checks.ch01 import (  # noqa: E402
    check_adamw_state_bytes,
    check_gpt_parameters,
    check_lora_parameters,
    check_verbalize,
)

from minipeft import GPT, GPTConfig  # noqa: E402
from minipeft.tokenizer import ByteTokenizer  # noqa: E402


# Exercise 1 — count a GPT's parameters.
def gpt_parameters(config: GPTConfig) -> int:
    """Per block: c_attn d·3d, attn.c_proj d·d, c_fc d·4d, mlp.c_proj 4d·d = 12d² weights; with biases 3d + d + 4d + d
    = 9d more, and two LayerNorms of d weights (+ d biases) each. Then the token embedding V·d (the output layer
    reuses it), the position embedding P·d and the final LayerNorm."""
    d, L, V, P = config.n_embd, config.n_layer, config.vocab_size, config.block_size
    ln = 2 * d if config.bias else d  # one LayerNorm: weight (d,) and, with bias, bias (d,)
    linear_biases = 9 * d if config.bias else 0  # 3d + d + 4d + d
    per_block = 12 * d * d + linear_biases + 2 * ln
    return L * per_block + V * d + P * d + ln


# Exercise 2 — count LoRA's trainable parameters.
def lora_parameters(config: GPTConfig, r: int, targets: list[str]) -> int:
    """A (r, in) and B (out, r) per targeted Linear; a target name matches every module whose name ends with it,
    so "c_proj" takes both attn.c_proj (d → d) and mlp.c_proj (4d → d)."""
    d = config.n_embd
    linears = {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, 4 * d), "mlp.c_proj": (4 * d, d)}
    per_block = sum(r * (i + o) for name, (i, o) in linears.items()
                    if any(name == t or name.endswith("." + t) for t in targets))
    return config.n_layer * per_block


# Exercise 3 — the bytes of full fine-tuning with AdamW.
def adamw_state_bytes(model: torch.nn.Module) -> int:
    """fp32: weight 4 + gradient 4 + m 4 + v 4 = 16 bytes per parameter, plus AdamW's step count, a 0-d fp32 tensor
    (4 bytes) per parameter tensor."""
    params = list(model.parameters())
    return sum(16 * p.numel() for p in params) + 4 * len(params)


# Exercise 4 — the verbalizer.
@torch.no_grad()
def verbalize(model: GPT, prompts: list[str]) -> list[str]:
    """One forward pass per prompt; the logits at the last position (vocab,); compare the two verbalizer tokens."""
    tok = ByteTokenizer()
    choices = ("good", "bad")
    ids = [tok.encode(c)[0] for c in choices]  # 'g', 'b'
    answers = []
    for prompt in prompts:
        idx = torch.tensor([tok.encode(prompt, add_bos=True)])  # (1, T)
        logits, _ = model(idx)  # (1, T, vocab)
        answers.append(choices[int(logits[0, -1, ids].argmax())])  # (2,) → index of the larger
    return answers


def main() -> None:
    check_gpt_parameters(gpt_parameters)
    check_lora_parameters(lora_parameters)
    check_adamw_state_bytes(adamw_state_bytes)
    check_verbalize(verbalize)


if __name__ == "__main__":
    main()
