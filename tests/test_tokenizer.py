"""Tokenizers: exact byte-level round trips, special tokens, and the tokenizer.json loader."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipeft.tokenizer import ByteTokenizer, load_tokenizer_json


@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert len(ids) == len(text.encode("utf-8")) + 2


def test_specials_are_named_when_not_skipped():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("hi", add_eos=True), skip_special_tokens=False) == "hi<|eos|>"
    assert tok.vocab_size == 260


def test_decode_rejects_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ByteTokenizer().decode([65, 999])


def test_encode_rejects_non_text():
    with pytest.raises(TypeError, match="str"):
        ByteTokenizer().encode(b"bytes")


def test_load_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<|endoftext|>": 0, "hello": 1, "world": 2, "[UNK]": 3}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<|endoftext|>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer_json(tmp_path)
    assert tok.encode("hello world", add_eos=True) == [1, 2, 0]
    assert tok.eos_token_id == 0 and tok.vocab_size == 4
    assert tok.decode([1, 2]) == "hello world"
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer_json(tmp_path / "missing")
