"""Scoring a model on a built-in task: verbalizer accuracy, or exact match of a greedy generation.

Classification reads the next-token logits at the answer position and compares only the first tokens of
the choices (the verbalizer), argmax over {g, b} for good/bad; a generation task decodes greedily until
the end-of-text token and counts answers that match exactly. Any model with GPT's forward contract and a
`generate` method can be scored: the base GPT, a PeftModel, a merged model.

A JSONL dataset (`evaluate_dataset`) is scored by teacher forcing: the mean cross-entropy over its supervised
tokens, L = −(1/N) Σ log p(yᵢ | context), and the perplexity exp(L); for the classification format, L is the
cross-entropy over the labels' first tokens (the loss it trains with) and the accuracy is how often the
label with the highest logit is the right one (chance: 1 / number of labels for balanced data).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minipeft.data import Example, Task
from minipeft.jsonl import JsonlDataset


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
    try:
        preds = predict(model, task, tokenizer, examples, prefix, batch_size)
    finally:
        model.train(was_training)
    return sum(p == ex.answer for p, ex in zip(preds, examples, strict=True)) / len(examples)


@torch.no_grad()
def evaluate_dataset(model, dataset: JsonlDataset, batch_size: int = 16) -> dict[str, float]:
    """{"loss", "perplexity"} on every row of `dataset`, plus "accuracy" for the classification format.

    The loss is the mean over all supervised tokens of the file (not a mean of batch means), so it does not
    depend on batch_size. The model is put in eval mode for the call and put back as it was.
    """
    if not isinstance(dataset, JsonlDataset):
        raise TypeError(f"evaluate_dataset expects a JsonlDataset (from load_jsonl), got {type(dataset).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    was_training = model.training
    model.eval()
    try:
        nll, count, correct = _dataset_sums(model, dataset, batch_size)
    finally:
        model.train(was_training)
    loss = nll / count
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}  # exp overflows a float past ~709
    if dataset.format == "classification":
        metrics["accuracy"] = correct / count
    return metrics


def _dataset_sums(model, dataset: JsonlDataset, batch_size: int) -> tuple[float, int, int]:
    """(summed negative log-likelihood, its count, correct answers) over every row of `dataset`."""
    device = next(model.parameters()).device
    choice_ids = torch.tensor(dataset.choice_ids, dtype=torch.long, device=device)
    nll, count, correct = 0.0, 0, 0
    for start in range(0, len(dataset), batch_size):
        idx, targets, mask = (t.to(device) for t in dataset.batch(range(start, min(start + batch_size, len(dataset)))))
        if dataset.format != "classification":
            n = int((targets != -100).sum())
            _, loss = model(idx, targets=targets, attention_mask=mask, return_logits=False)  # chunked: no (B, T, V)
            nll, count = nll + loss.item() * n, count + n
            continue
        logits, _ = model(idx, attention_mask=mask)  # (B, T, vocab)
        rows = torch.arange(idx.shape[0], device=device)
        pos = (targets != -100).int().argmax(dim=1)  # (B,) the position that predicts the label
        scores = logits[rows, pos][:, choice_ids].float()  # (B, n_labels)
        label = (targets[rows, pos, None] == choice_ids).int().argmax(dim=1)  # (B,)
        nll += F.cross_entropy(scores, label, reduction="sum").item()
        correct += int((scores.argmax(dim=1) == label).sum())
        count += idx.shape[0]
    return nll, count, correct
