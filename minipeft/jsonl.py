"""Your own data: a JSONL file (one JSON object a line) read in one pass, tokenized, and served as batches.

The format is read off the keys of the first row, and every row must have exactly the same keys:

    {"text": "..."}                          text            causal language modelling on the whole text
    {"prompt": "...", "completion": "..."}   completion      the loss on the completion (and EOS) only
    {"text": "...", "label": "..."}          classification  the label read off a verbalizer

How each row becomes tokens, and which of them are supervised (targets are shifted: position t predicts
token t+1, and only the positions marked ^ count in the loss):

    text            BOS t₁ … tₙ EOS                       every token after BOS
                        ^  …  ^  ^
    completion      BOS p₁ … pₘ c₁ … cₖ EOS               the completion and EOS
                                ^  …  ^  ^
    classification  BOS x₁ … xₙ y                          y = the first token of the label, only
                                ^

Classification is read off a verbalizer (PET, Schick & Schütze 2021, https://arxiv.org/abs/2001.07676): the
label word follows the text directly, and the model's score for label j is the logit of its first token
y_j at the last text position,  p(j | x) = softmax_j(logits[y_1], …, logits[y_J]),  so two labels must
start with different tokens (an error names them otherwise). End the text with the cue you want the model
to answer after ("… Sentiment:"); the text is used exactly as given.

Rows longer than `max_length` tokens are truncated and counted (`JsonlDataset.summary()`): a text keeps its
beginning; a prompt loses its beginning (its end is next to the answer, so it matters most), and a
completion longer than max_length − 1 keeps its beginning. Nothing is dropped silently.

Streaming. The file is read line by line, never held whole (as text or as parsed JSON); each row is checked
and tokenized as it is read, and only its token ids are kept, in flat int32 arrays (4 bytes a token, about
the size of the file itself for BPE), so a large file costs its tokens and no more. An empty file, a line
that is not JSON, a missing or extra key, a value that is not a string, or (with the training labels given)
a label never seen in training raises a ValueError that starts with `file:line:`.
"""

from __future__ import annotations

import json
import logging
import random
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "JsonlDataset", "EpochBatches", "load_jsonl", "pad_right"]

# format name -> the keys of its rows (a row has exactly these, in any order)
FORMATS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "completion": ("prompt", "completion"),
    "classification": ("text", "label"),
}
_SHOWN = {name: "{" + ", ".join(f'"{k}"' for k in keys) + "}" for name, keys in FORMATS.items()}


def pad_right(rows: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], pad_token_id: int):
    """Right-pad token rows into tensors: idx (B, T) filled with pad_token_id, targets (B, T) with -100,
    attention_mask (B, T) with 1 on real tokens; T is the longest row."""
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    tgt = torch.full((len(rows), T), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, targets, strict=True)):
        idx[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        tgt[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        mask[i, : len(r)] = 1
    return idx, tgt, mask


class JsonlDataset:
    """The tokenized rows of one JSONL file (built by `load_jsonl`).

    Row i is ids[starts[i] : starts[i+1]]; its first supervised token is at position answer_starts[i]
    (classification: the only one). `labels` are the classification labels in order of first appearance
    (empty otherwise) and `choice_ids` their first tokens: the verbalizer.
    """

    def __init__(self, path: str, format: str, max_length: int, pad_token_id: int, ids: array, starts: array,
                 answer_starts: array, labels: tuple[str, ...], choice_ids: tuple[int, ...], n_truncated: int,
                 longest: int) -> None:
        self.path = path
        self.format = format
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self.labels = labels
        self.choice_ids = choice_ids
        self.n_truncated = n_truncated  # rows that were longer than max_length
        self.longest = longest  # tokens of the longest row before truncation
        self._ids, self._starts, self._answer_starts = ids, starts, answer_starts

    def __len__(self) -> int:
        return len(self._answer_starts)

    @property
    def num_tokens(self) -> int:
        return len(self._ids)

    def row(self, i: int) -> list[int]:
        """Row i's token ids, as the model sees them (BOS first, truncated to max_length)."""
        return self._ids[self._starts[i] : self._starts[i + 1]].tolist()

    def row_targets(self, i: int) -> list[int]:
        """Row i's shifted targets: targets[t] = ids[t + 1] where supervised, else -100 (same length as the row)."""
        ids, a = self.row(i), self._answer_starts[i]
        if self.format == "classification":
            return [-100] * (a - 1) + [ids[a]] + [-100]
        return [-100] * (a - 1) + ids[a:] + [-100]

    def batch(self, indices: Sequence[int]):
        """(idx, targets, attention_mask), each (B, T) with T the longest of these rows, right-padded."""
        indices = list(indices)
        if not indices:
            raise ValueError("batch: indices is empty")
        return pad_right([self.row(i) for i in indices], [self.row_targets(i) for i in indices], self.pad_token_id)

    def batches(self, batch_size: int, seed: int = 0, shuffle: bool = True) -> EpochBatches:
        """A `get_batch` for `minipeft.train.train`: shuffled epochs, `batch_size` rows a batch."""
        return EpochBatches(self, batch_size, seed, shuffle)

    def summary(self) -> str:
        """One line a user can check: rows, format, tokens, and how many rows were truncated."""
        line = (f"{self.path}: {len(self):,} rows of {_SHOWN[self.format]} ({self.format}), {self.num_tokens:,} "
                f"tokens (mean {self.num_tokens / len(self):.1f}, longest {self.longest:,} before truncation)")
        if self.labels:
            line += f"; labels {list(self.labels)}"
        if self.n_truncated:
            line += (f"; {self.n_truncated:,} rows ({self.n_truncated / len(self):.1%}) were longer than "
                     f"max_length={self.max_length} and were truncated")
        return line


class EpochBatches:
    """Batches for `train()`: the rows in a shuffled order, epoch after epoch, `batch_size` at a time.

    Epoch e's order is a shuffle seeded by (seed, e), so the batch drawn k-th depends only on the seed and k:
    that count is the whole state (`state_dict`), which a training checkpoint saves so that a resumed run
    draws the same batches as one that never stopped. The generator `train()` passes is not used. A batch
    that runs past the end of an epoch continues into the next one's order.
    """

    def __init__(self, dataset: JsonlDataset, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.batches_drawn = 0
        self._order: tuple[int, list[int]] | None = None  # (epoch, its row order), the one in use

    def order(self, epoch: int) -> list[int]:
        """The row order of `epoch` (0-based)."""
        if self._order is None or self._order[0] != epoch:
            rows = list(range(len(self.dataset)))
            if self.shuffle:
                random.Random(f"jsonl-{self.seed}-{epoch}").shuffle(rows)
            self._order = (epoch, rows)
        return self._order[1]

    def indices(self, k: int) -> list[int]:
        """The rows of the k-th batch (0-based)."""
        n = len(self.dataset)
        positions = range(k * self.batch_size, (k + 1) * self.batch_size)  # positions in the endless row stream
        return [self.order(p // n)[p % n] for p in positions]

    def __call__(self, generator: torch.Generator | None = None):
        batch = self.dataset.batch(self.indices(self.batches_drawn))
        self.batches_drawn += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        drawn = state.get("batches_drawn") if isinstance(state, dict) else None
        if isinstance(drawn, bool) or not isinstance(drawn, int) or drawn < 0:
            raise ValueError(f"EpochBatches state must be {{'batches_drawn': int >= 0}}, got {state!r}")
        self.batches_drawn = drawn


# ------------------------------------------------------------------------------------------ reading
def _clip(text: str, n: int = 60) -> str:
    text = text.strip()
    return repr(text if len(text) <= n else text[:n] + "…")


def _json_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for every non-blank line, one line in memory at a time."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # blank lines (a trailing newline, a gap) are not rows
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno}): "
                                 f"{_clip(text)}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object such as {{\"text\": \"...\"}}, got "
                                 f"{type(row).__name__} {_clip(text)}")
            yield lineno, row


def _detect(keys: frozenset[str], where: str) -> str:
    for name, expected in FORMATS.items():
        if keys == frozenset(expected):
            return name
    shown = " or ".join(_SHOWN.values())
    raise ValueError(f"{where}: keys {sorted(keys)} match no format; a row has exactly the keys {shown}")


def _check_tokenizer(tokenizer: Any) -> None:
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(f"tokenizer must have an encode(text) method, got {type(tokenizer).__name__}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"tokenizer.{name} must be a token id (int >= 0), got {value!r}; give it when loading "
                             "the tokenizer (load_tokenizer_json(..., eos_token_id=..., pad_token_id=...))")


class _Reader:
    """The state of one pass over a file: the flat token arrays, the label table, the truncation count."""

    def __init__(self, path: Path, tokenizer: Any, max_length: int, labels: Sequence[str] | None) -> None:
        self.path, self.tok, self.max_length = path, tokenizer, max_length
        self.fixed_labels = labels is not None  # evaluation data: only the training labels are allowed
        self.labels: dict[str, int] = {}  # label -> its first token
        self.label_lines: dict[str, int] = {}
        if labels is not None:
            for label in labels:
                self._add_label(label, f"labels[{len(self.labels)}]")
        self.ids, self.starts, self.answer_starts = array("i"), array("q", [0]), array("i")
        self.n_truncated = self.longest = 0

    def _add_label(self, label: str, where: str) -> None:
        first = self.tok.encode(label)[:1]
        if not first:
            raise ValueError(f"{where}: label {label!r} has no tokens; a label must be a word the model can say")
        for other, other_first in self.labels.items():
            if other_first == first[0]:
                raise ValueError(f"{where}: labels {other!r} and {label!r} both start with token id {first[0]}; the "
                                 "verbalizer reads one logit per label (its first token), so the labels must start "
                                 "with different tokens: rename one")
        self.labels[label] = first[0]

    def label_token(self, label: str, lineno: int) -> int:
        if label not in self.labels:
            if self.fixed_labels:
                raise ValueError(f"{self.path}:{lineno}: label {label!r} was never seen in training; the training "
                                 f"labels are {list(self.labels)}")
            self._add_label(label, f"{self.path}:{lineno}")
            self.label_lines[label] = lineno
        return self.labels[label]

    def add(self, prompt: list[int], answer: list[int]) -> None:
        """Append one row = prompt + answer, truncated to max_length (see the module docstring)."""
        n = len(prompt) + len(answer)
        self.longest = max(self.longest, n)
        if n > self.max_length:
            self.n_truncated += 1
            if not answer:  # text: keep the beginning
                prompt = prompt[: self.max_length]
            else:  # a prompt keeps its end, an answer its beginning; at least one prompt token predicts it
                answer = answer[: self.max_length - 1]
                prompt = prompt[len(prompt) - (self.max_length - len(answer)) :]
        self.ids.extend(prompt)
        self.ids.extend(answer)
        self.starts.append(len(self.ids))
        self.answer_starts.append(len(prompt) if answer else 1)


def _text(row: dict[str, Any], key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: \"{key}\" must be a string, got {type(value).__name__} {value!r}")
    return value


def load_jsonl(path: str | Path, tokenizer: Any, max_length: int = 1024, *, labels: Sequence[str] | None = None,
               format: str | None = None) -> JsonlDataset:
    """Read a JSONL file of one of three row formats (see the module docstring) into a `JsonlDataset`.

    Args:
        path: the file; rows are read one line at a time.
        tokenizer: anything with encode(text) -> ids and bos/eos/pad_token_id (ByteTokenizer, or a tokenizer.json
            loaded with `minipeft.load_tokenizer_json`).
        max_length: the most tokens a row keeps (BOS included); longer rows are truncated and counted. Use the
            model's block_size less any virtual tokens.
        labels: for evaluation data, the training set's labels (`train.labels`): a row with another label is an
            error naming its line. None (or empty, as `train.labels` of a file that is not classification): the
            labels are whatever the file holds (at least two).
        format: the format the rows must have (evaluation data: `train.format`); None: the first row's.

    Raises:
        ValueError: starting with `path:line:` for a bad row; an empty file, a missing file, or bad arguments.
        TypeError: a tokenizer without encode().
    """
    path = Path(path)
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise TypeError(f"max_length must be an int, got {type(max_length).__name__} {max_length!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (BOS and one token to predict), got {max_length}")
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)} or None, got {format!r}")
    if labels is not None and (isinstance(labels, str) or not all(isinstance(x, str) for x in labels)):
        raise TypeError(f"labels must be a sequence of strings (the training labels) or None, got {labels!r}")
    labels = tuple(labels) if labels else None
    _check_tokenizer(tokenizer)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist or is not a file")
    reader = _Reader(path, tokenizer, max_length, labels)
    bos, eos = [tokenizer.bos_token_id], [tokenizer.eos_token_id]
    first_line = None
    for lineno, row in _json_rows(path):
        where = f"{path}:{lineno}"
        if first_line is not None and frozenset(row) != frozenset(FORMATS[format]):
            raise ValueError(f"{where}: keys {sorted(row)}, but line {first_line} has {_SHOWN[format]} ({format}); "
                             "every row of a file must have the same keys")
        if first_line is None:
            row_format = _detect(frozenset(row), where)
            first_line = lineno
            if format is not None and row_format != format:
                raise ValueError(f"{where}: a {row_format} row {_SHOWN[row_format]}, but the training data is "
                                 f"{format} {_SHOWN[format]}; both files must have the same format")
            format = row_format
            if labels is not None and format != "classification":
                raise ValueError(f"{where}: labels were given, but the rows are {format} {_SHOWN[format]}")
        if format == "text":
            reader.add(bos + tokenizer.encode(_text(row, "text", where)) + eos, [])
        elif format == "completion":
            prompt = bos + tokenizer.encode(_text(row, "prompt", where))
            reader.add(prompt, tokenizer.encode(_text(row, "completion", where)) + eos)
        else:
            label = reader.label_token(_text(row, "label", where), lineno)
            reader.add(bos + tokenizer.encode(_text(row, "text", where)), [label])
    if first_line is None:
        raise ValueError(f"{path}:1: the file holds no rows (it is empty or blank)")
    if format == "classification" and len(reader.labels) < 2:
        raise ValueError(f"{path}: every row has the label {next(iter(reader.labels))!r}; classification needs at "
                         "least two labels")
    dataset = JsonlDataset(str(path), format, max_length, tokenizer.pad_token_id, reader.ids, reader.starts,
                           reader.answer_starts, tuple(reader.labels), tuple(reader.labels.values()),
                           reader.n_truncated, reader.longest)
    (logger.warning if dataset.n_truncated else logger.info)("%s", dataset.summary())
    return dataset
