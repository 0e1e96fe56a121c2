"""Scoring a model on a built-in task: verbalizer accuracy, or exact match of a greedy generation.

Classification reads the next-token logits at the answer position and compares only the first tokens of
the choices (the verbalizer), argmax over {g, b} for good/bad; a generation task decodes greedily until
the end-of-text token and counts answers that match exactly. Any model with GPT's forward contract and a
`generate` method can be scored: the base GPT, a PeftModel, a merged model.
"""

from __future__ import annotations

import torch

from minipeft.data import Example, Task


def _left_padded(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return idx.to(device), mask.to(device)


@torch.no_grad()
def predict(model, task: Task, tokenizer, examples: list[Example], prefix: str = "", batch_size: int = 64,
            device=None) -> list[str]:
    """The model's answer to each example: a choice (classification) or the decoded generation."""
    device = device or next(model.parameters()).device
    preds: list[str] = []
    choice_ids = [tokenizer.encode(c)[0] for c in task.choices]
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        rows = [tokenizer.encode(prefix + ex.prompt, add_bos=True) for ex in chunk]
        idx, mask = _left_padded(rows, tokenizer.pad_token_id, device)
        if task.metric == "accuracy":
            logits, _ = model(idx, attention_mask=mask)  # left padding: the last column is every row's last token
            scores = logits[:, -1, choice_ids].float()  # (B, n_choices)
            preds.extend(task.choices[i] for i in scores.argmax(dim=-1).tolist())
        else:
            # never past the model's context: virtual tokens and prompt count against block_size
            room = model.config.block_size - idx.shape[1] - getattr(model, "num_virtual_tokens", 0)
            if room <= 0:
                raise ValueError(f"prompts of {idx.shape[1]} tokens leave no room to generate in block_size "
                                 f"{model.config.block_size}")
            out = model.generate(idx, max_new_tokens=min(task.max_new_tokens, room), attention_mask=mask,
                                 eos_token_id=tokenizer.eos_token_id)
            for row in out[:, idx.shape[1]:].tolist():
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id)]
                preds.append(tokenizer.decode(row))
    return preds


def evaluate(model, task: Task, tokenizer, split: str = "test", max_examples: int | None = None,
             prefix: str = "", batch_size: int = 64) -> float:
    """The task metric (accuracy or exact match, in [0, 1]) on a split."""
    examples = task.split(split)[:max_examples]
    if not examples:
        raise ValueError(f"split {split!r} of task {task.name!r} is empty")
    was_training = model.training
    model.eval()
    preds = predict(model, task, tokenizer, examples, prefix, batch_size)
    model.train(was_training)
    return sum(p == ex.answer for p, ex in zip(preds, examples, strict=True)) / len(examples)
