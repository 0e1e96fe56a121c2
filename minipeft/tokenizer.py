"""Tokenizers: a byte-level one for the built-in data, and a loader for a GPT-2 `tokenizer.json`.

A byte-level tokenizer needs no training and no vocabulary file: every UTF-8 string is its bytes, so
encode/decode is an exact round trip, and 256 byte ids plus a few special ids make the whole vocabulary.
The cost is length (one token per byte), which the built-in world's short sentences can afford.
Real GPT-2 checkpoints use byte-level BPE (Radford et al. 2019, section 2.2); `load_tokenizer_json` reads
a local `tokenizer.json` through the `tokenizers` package and gives it the same small interface.
"""

from __future__ import annotations

from pathlib import Path


class ByteTokenizer:
    """ids 0…255 are the bytes of UTF-8 text; 256… are the special tokens below."""

    SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|sep|>")

    def __init__(self) -> None:
        self.pad_token_id = 256
        self.bos_token_id = 257
        self.eos_token_id = 258
        self.sep_token_id = 259
        self.vocab_size = 256 + len(self.SPECIALS)  # 260

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects text as str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return ([self.bos_token_id] if add_bos else []) + ids + ([self.eos_token_id] if add_eos else [])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Bytes back to text. Special ids are dropped (or written by name); invalid UTF-8 becomes '�'."""
        out, chunk = [], bytearray()
        for i in (int(t) for t in ids):
            if 0 <= i < 256:
                chunk.append(i)
                continue
            if not 256 <= i < self.vocab_size:
                raise ValueError(f"decode: token id {i} is outside the vocabulary 0…{self.vocab_size - 1}")
            out.append(chunk.decode("utf-8", errors="replace"))
            chunk = bytearray()
            if not skip_special_tokens:
                out.append(self.SPECIALS[i - 256])
        out.append(chunk.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_to_str(self, i: int) -> str:
        """A printable name for one id (used to show nearest tokens of a soft prompt)."""
        if i >= 256:
            return self.SPECIALS[i - 256]
        ch = bytes([i]).decode("latin-1")
        return ch if ch.isprintable() else f"<0x{i:02X}>"


class HFTokenizer:
    """A `tokenizers.Tokenizer` (from a local tokenizer.json) behind ByteTokenizer's interface."""

    def __init__(self, tokenizer, eos_token: str = "<|endoftext|>") -> None:
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        eos = tokenizer.token_to_id(eos_token)
        self.eos_token_id = eos
        self.bos_token_id = eos  # GPT-2 uses <|endoftext|> for both
        self.pad_token_id = eos
        self.sep_token_id = eos

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_token_id] if add_bos else []) + ids + ([self.eos_token_id] if add_eos else [])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_str(self, i: int) -> str:
        return self._tok.id_to_token(int(i))


def load_tokenizer_json(path: str | Path) -> HFTokenizer:
    """Load a tokenizer.json file (or a directory holding one), e.g. from a local GPT-2 checkpoint."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:  # pragma: no cover - tokenizers is in the dev extra
        raise ImportError("load_tokenizer_json needs the `tokenizers` package: pip install tokenizers") from e
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"load_tokenizer_json: no tokenizer.json at {str(path)!r}")
    return HFTokenizer(Tokenizer.from_file(str(path)))
