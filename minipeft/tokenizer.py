"""Tokenizers: a byte-level one for the built-in data, and a loader for a GPT-2 `tokenizer.json`.

A byte-level tokenizer needs no training and no vocabulary file: every UTF-8 string is its bytes, so
encode/decode is an exact round trip, and 256 byte ids plus a few special ids make the whole vocabulary.
The cost is length (one token per byte), which the built-in world's short sentences can afford.
Real GPT-2 checkpoints use byte-level BPE (Radford et al. 2019, section 2.2); `load_tokenizer_json` reads
a local `tokenizer.json` (Hugging Face `tokenizers` format) and gives it the same small interface, with
its special ids: EOS, BOS and PAD given by the caller, or read from the `tokenizer_config.json` beside the
file (transformers writes one), or GPT-2's `<|endoftext|>`; PAD and BOS default to EOS, as in GPT-2.
`load_tokenizer` picks for a model directory: its tokenizer.json when it has one, else the byte tokenizer.
"""

from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer


def _check_flags(**flags: object) -> None:
    """add_bos, add_eos, skip_special_tokens: True or False ("no" is truthy: the intent of a str is unclear)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def _token_id(i: object, vocab_size: int, what: str = "token id") -> int:
    """One token id as an int (an int, a numpy integer or a 0-d integer tensor; never a float, which int() would
    truncate, nor a bool), in 0 … vocab_size − 1."""
    try:
        if isinstance(i, bool):
            raise TypeError
        value = operator.index(i)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(i).__name__} {i!r}") from None
    if not 0 <= value < vocab_size:
        raise ValueError(f"{what} {value} is outside the vocabulary 0…{vocab_size - 1}")
    return value


def _token_ids(ids: object, vocab_size: int) -> list[int]:
    """decode's ids as a list of ints, each checked by _token_id."""
    if isinstance(ids, str | bytes) or not hasattr(ids, "__iter__"):
        raise TypeError(f"decode expects a sequence of token ids, got {type(ids).__name__}")
    return [_token_id(i, vocab_size, "decode: token id") for i in ids]


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
        _check_flags(add_bos=add_bos, add_eos=add_eos)
        ids = list(text.encode("utf-8"))
        return ([self.bos_token_id] if add_bos else []) + ids + ([self.eos_token_id] if add_eos else [])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Bytes back to text. Special ids are dropped (or written by name); invalid UTF-8 becomes '�'. An id that
        is not an int is a TypeError, one outside the vocabulary a ValueError."""
        _check_flags(skip_special_tokens=skip_special_tokens)
        out, chunk = [], bytearray()
        for i in _token_ids(ids, self.vocab_size):
            if i < 256:
                chunk.append(i)
                continue
            out.append(chunk.decode("utf-8", errors="replace"))
            chunk = bytearray()
            if not skip_special_tokens:
                out.append(self.SPECIALS[i - 256])
        out.append(chunk.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_to_str(self, i: int) -> str:
        """A printable name for one id (used to show nearest tokens of a soft prompt)."""
        i = _token_id(i, self.vocab_size)
        if i >= 256:
            return self.SPECIALS[i - 256]
        ch = bytes([i]).decode("latin-1")
        return ch if ch.isprintable() else f"<0x{i:02X}>"


class HFTokenizer:
    """A `tokenizers.Tokenizer` (from a local tokenizer.json) behind ByteTokenizer's interface."""

    def __init__(self, tokenizer: Tokenizer, eos_token_id: int, pad_token_id: int | None = None,
                 bos_token_id: int | None = None) -> None:
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_token_id = eos_token_id
        self.bos_token_id = eos_token_id if bos_token_id is None else bos_token_id  # GPT-2: <|endoftext|> for all
        self.pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
        self.sep_token_id = self.eos_token_id

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects text as str, got {type(text).__name__}")
        _check_flags(add_bos=add_bos, add_eos=add_eos)
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_token_id] if add_bos else []) + ids + ([self.eos_token_id] if add_eos else [])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Token ids back to text; as ByteTokenizer.decode, an id outside the vocabulary is a ValueError (the
        tokenizers library would drop it silently)."""
        _check_flags(skip_special_tokens=skip_special_tokens)
        return self._tok.decode(_token_ids(ids, self.vocab_size), skip_special_tokens=skip_special_tokens)

    def token_to_str(self, i: int) -> str:
        return self._tok.id_to_token(_token_id(i, self.vocab_size))


DEFAULT_EOS = "<|endoftext|>"  # GPT-2's end-of-text token, its only special token


def _config_token(config: dict[str, Any], key: str) -> str | None:
    """A special token's text in tokenizer_config.json: a string, or transformers' {"content": ...} form."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_id(tok: Tokenizer, name: str, given: int | None, text: str | None, source: str) -> int | None:
    """The id `given` (checked against the vocabulary), else the id of `text`, else None."""
    size = tok.get_vocab_size()
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, int) or not 0 <= given < size:
            raise ValueError(f"{name} must be a token id in 0…{size - 1}, got {given!r}")
        return given
    if text is None:
        return None
    found = tok.token_to_id(text)
    if found is None:
        raise ValueError(f"{source} names {text!r} as the {name.removesuffix('_id')}, but it is not in the "
                         f"vocabulary; give {name} explicitly")
    return found


def load_tokenizer_json(path: str | Path, *, eos_token_id: int | None = None, pad_token_id: int | None = None,
                        bos_token_id: int | None = None) -> HFTokenizer:
    """Load a tokenizer.json file (or a directory holding one), e.g. from a local GPT-2 checkpoint.

    Special ids: the ones given win; otherwise eos_token / bos_token / pad_token of a tokenizer_config.json in
    the same folder; otherwise EOS is `<|endoftext|>` if the vocabulary has it. BOS and PAD default to EOS.
    Padding positions are masked out of attention and loss, so PAD = EOS is safe.

    Raises:
        ValueError: no tokenizer.json there, an unreadable one, an id outside the vocabulary, or no EOS found.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"load_tokenizer_json: no tokenizer.json at {str(path)!r}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises its own Exception type for a malformed file
        raise ValueError(f"load_tokenizer_json: {str(path)!r} is not a tokenizers file: {e}") from e
    config_path = path.with_name("tokenizer_config.json")
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"load_tokenizer_json: {config_path} is not JSON: {e}") from e
        if not isinstance(config, dict):
            raise ValueError(f"load_tokenizer_json: {config_path} must hold a JSON object, got a "
                             f"{type(config).__name__}")
    source = str(config_path)
    eos = _special_id(tok, "eos_token_id", eos_token_id, _config_token(config, "eos_token"), source)
    if eos is None:
        eos = tok.token_to_id(DEFAULT_EOS)
    if eos is None:
        raise ValueError(f"load_tokenizer_json: {str(path)!r} has no {DEFAULT_EOS} token and no tokenizer_config.json "
                         "beside it names an eos_token; give eos_token_id (and pad_token_id if PAD differs)")
    pad = _special_id(tok, "pad_token_id", pad_token_id, _config_token(config, "pad_token"), source)
    bos = _special_id(tok, "bos_token_id", bos_token_id, _config_token(config, "bos_token"), source)
    return HFTokenizer(tok, eos, pad, bos)


def load_tokenizer(model_dir: str | Path | None = None, tokenizer_file: str | Path | None = None, *,
                   eos_token_id: int | None = None, pad_token_id: int | None = None) -> HFTokenizer | ByteTokenizer:
    """The tokenizer for a model: `tokenizer_file` if given, else `model_dir`/tokenizer.json if it exists, else
    the byte tokenizer (whose special ids are fixed: giving others is an error)."""
    if tokenizer_file is None and model_dir is not None and (Path(model_dir) / "tokenizer.json").is_file():
        tokenizer_file = Path(model_dir) / "tokenizer.json"
    if tokenizer_file is not None:
        return load_tokenizer_json(tokenizer_file, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if eos_token_id is not None or pad_token_id is not None:
        raise ValueError(f"no tokenizer.json (in {str(model_dir)!r} or given), so the byte tokenizer is used, whose "
                         f"special ids are fixed (pad 256, eos 258); eos_token_id / pad_token_id apply to a "
                         "tokenizer.json")
    return ByteTokenizer()
