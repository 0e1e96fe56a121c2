"""The GPT: parity with transformers' GPT-2, causality, KV-cache generation, padding, and bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close

from minipeft.model import GPT, GPTConfig, KVCache

transformers = pytest.importorskip("transformers")


def small_config(**kw) -> GPTConfig:
    return GPTConfig(**{"block_size": 64, "vocab_size": 97, "n_layer": 2, "n_head": 4, "n_embd": 32, **kw})


@pytest.fixture(scope="module")
def hf_gpt2_dir(tmp_path_factory):
    """A randomly initialised transformers GPT-2, saved as safetensors; nothing is downloaded."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorms, so a missed transpose cannot hide
        for name, p in hf.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(path, safe_serialization=True)
    return path, hf


def test_from_pretrained_matches_transformers_logits(hf_gpt2_dir):
    path, hf = hf_gpt2_dir
    ours = GPT.from_pretrained(path).eval()
    idx = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx)
    assert logits.shape == (3, 40, 97)
    assert_close(logits, expected, "interop")


def test_greedy_generation_identical_to_transformers(hf_gpt2_dir):
    path, hf = hf_gpt2_dir
    ours = GPT.from_pretrained(path).eval()
    idx = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(2))
    expected = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=12, do_sample=False,
                           pad_token_id=0)
    assert torch.equal(ours.generate(idx, max_new_tokens=12), expected)


def test_save_pretrained_round_trips_and_loads_in_transformers(tmp_path):
    torch.manual_seed(3)
    model = GPT(small_config()).eval()
    model.save_pretrained(tmp_path)
    idx = torch.randint(0, 97, (2, 16))
    again = GPT.from_pretrained(tmp_path).eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected, _ = model(idx)
        assert torch.equal(again(idx)[0], expected)
        assert_close(hf(idx).logits, expected, "interop")


def test_lm_head_is_tied_and_counted_once():
    model = GPT(small_config())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.num_parameters() == sum(p.numel() for p in set(model.parameters()))


@given(T=st.integers(2, 32), cut=st.integers(1, 31), seed=st.integers(0, 2**16))
def test_causality_future_tokens_never_change_earlier_logits(T, cut, seed):
    cut = min(cut, T - 1)
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 97, (1, T), generator=g)
    b = a.clone()
    b[:, cut:] = torch.randint(0, 97, (1, T - cut), generator=g)
    with torch.no_grad():
        la, lb = model(a)[0], model(b)[0]
    assert_close(la[:, :cut], lb[:, :cut])


def greedy_without_cache(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """The obvious O(n²) loop: recompute the whole sequence for every new token."""
    for _ in range(n):
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@given(B=st.integers(1, 3), T=st.integers(1, 20), n=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_kv_cache_generation_equals_no_cache(B, T, n, seed):
    torch.manual_seed(seed % 7)
    model = GPT(small_config()).eval()
    idx = torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert torch.equal(model.generate(idx, max_new_tokens=n), greedy_without_cache(model, idx, n))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_each_sequence_alone(side):
    torch.manual_seed(4)
    model = GPT(small_config()).eval()
    lengths = [5, 12, 9]
    T = max(lengths)
    seqs = [torch.randint(0, 97, (n,)) for n in lengths]
    idx = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        where = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        idx[i, where], mask[i, where] = s, 1
    with torch.no_grad():
        batched, _ = model(idx, attention_mask=mask)
        for i, s in enumerate(seqs):
            alone, _ = model(s[None])
            where = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            assert_close(batched[i, where], alone[0])
    assert not torch.isnan(batched).any()


@given(T=st.integers(1, 12), k=st.integers(1, 14), n_virtual=st.integers(0, 3), seed=st.integers(0, 5))
def test_logits_to_keep_gives_the_last_positions_logits(T, k, n_virtual, seed):
    """forward(logits_to_keep=k): the logits of the last k positions (all of them when k >= T), the same values
    as the whole forward's, with or without virtual tokens in front (generate's prompt pass keeps 1)."""
    torch.manual_seed(seed)
    model = GPT(small_config()).eval()
    idx = torch.randint(0, 97, (2, T))
    kw = {"prompt_embeds": torch.randn(n_virtual, 32)} if n_virtual else {}
    with torch.no_grad():
        whole, _ = model(idx, **kw)
        kept, _ = model(idx, logits_to_keep=k, **kw)
    assert kept.shape == (2, min(k, T), 97)
    assert_close(kept, whole[:, -k:])


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_logits_to_keep_must_be_a_count(bad):
    with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
        GPT(small_config())(torch.zeros(1, 3, dtype=torch.long), logits_to_keep=bad)
    with pytest.raises(ValueError, match="logits_to_keep > 0 with targets"):
        GPT(small_config())(torch.zeros(1, 3, dtype=torch.long), targets=torch.zeros(1, 3, dtype=torch.long),
                            logits_to_keep=1)


def test_left_padded_generation_matches_each_prompt_alone():
    torch.manual_seed(5)
    model = GPT(small_config()).eval()
    seqs = [torch.randint(0, 97, (n,)) for n in (3, 8)]
    idx = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, 8 - len(s):], mask[i, 8 - len(s):] = s, 1
    out = model.generate(idx, max_new_tokens=10, attention_mask=mask)
    for i, s in enumerate(seqs):
        assert torch.equal(out[i, 8:], model.generate(s[None], max_new_tokens=10)[0, len(s):])


def test_loss_is_mean_cross_entropy_ignoring_minus_100():
    torch.manual_seed(6)
    model = GPT(small_config()).eval()
    idx = torch.randint(0, 97, (2, 10))
    targets = torch.randint(0, 97, (2, 10))
    targets[0, :4] = -100
    logits, loss = model(idx, targets=targets)
    keep = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert_close(loss, expected)


def test_sampling_respects_top_k_and_is_reproducible():
    torch.manual_seed(7)
    model = GPT(small_config()).eval()
    idx = torch.randint(0, 97, (4, 5))
    kw = dict(max_new_tokens=1, do_sample=True, temperature=0.7, top_k=3)
    out = model.generate(idx, generator=torch.Generator().manual_seed(0), **kw)
    again = model.generate(idx, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(out, again)
    top3 = model(idx)[0][:, -1].topk(3).indices
    assert all(out[i, -1] in top3[i] for i in range(4))


def test_eos_stops_a_row():
    torch.manual_seed(8)
    model = GPT(small_config()).eval()
    idx = torch.randint(0, 97, (1, 4))
    first = model.generate(idx, max_new_tokens=1)[0, -1].item()
    out = model.generate(idx, max_new_tokens=6, eos_token_id=first)
    assert (out[0, 4:] == first).all()


def test_prefix_cache_entries_are_always_visible():
    torch.manual_seed(9)
    cfg = small_config()
    model = GPT(cfg).eval()
    hs = cfg.n_embd // cfg.n_head
    keys = [torch.randn(1, cfg.n_head, 3, hs) for _ in range(cfg.n_layer)]
    values = [torch.randn(1, cfg.n_head, 3, hs) for _ in range(cfg.n_layer)]
    idx = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        with_prefix, _ = model(idx, kv_cache=KVCache.from_prefix(keys, values))
        plain, _ = model(idx)
    assert not torch.allclose(with_prefix[:, 0], plain[:, 0])  # even the first token sees the prefix


# ------------------------------------------------------------------ bad input
def test_index_out_of_vocab_is_a_clear_error():
    model = GPT(small_config())
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[1, 97]]))


def test_sequence_longer_than_block_size_is_a_clear_error():
    model = GPT(small_config())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10)


def test_float_idx_is_a_type_error():
    with pytest.raises(TypeError, match="idx"):
        GPT(small_config())(torch.zeros(1, 3))


@pytest.mark.parametrize("bad", [dict(n_embd=30, n_head=4), dict(n_layer=0), dict(dropout=1.0)])
def test_bad_config_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="GPTConfig"):
        small_config(**bad)


def test_from_pretrained_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        GPT.from_pretrained(tmp_path / "nope")


def test_from_pretrained_not_gpt2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        GPT.from_pretrained(tmp_path)


def test_from_pretrained_refuses_pickles(tmp_path):
    model = GPT(small_config())
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("key,value", [("scale_attn_weights", False), ("scale_attn_by_inverse_layer_idx", True),
                                       ("attn_pdrop", 0.3)])
def test_from_pretrained_refuses_gpt2_options_it_does_not_implement(tmp_path, key, value):
    """Computing another attention (or another dropout) silently would be worse than refusing."""
    GPT(small_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError, match=key if key != "attn_pdrop" else "one dropout rate"):
        GPT.from_pretrained(tmp_path)


# fmt: off
@pytest.mark.parametrize("kwargs, error, words", [
    pytest.param({"layer_norm_epsilon": float("nan")}, ValueError, "layer_norm_epsilon must be a finite number > 0",
                 id="eps-nan"),
    pytest.param({"layer_norm_epsilon": float("inf")}, ValueError, "layer_norm_epsilon must be a finite", id="eps-inf"),
    pytest.param({"layer_norm_epsilon": 0.0}, ValueError, "layer_norm_epsilon must be a finite number > 0",
                 id="eps-zero"),
    pytest.param({"layer_norm_epsilon": -1e-5}, ValueError, "layer_norm_epsilon", id="eps-negative"),
    pytest.param({"layer_norm_epsilon": "1e-5"}, TypeError, "layer_norm_epsilon must be a real number.*str '1e-5'",
                 id="eps-str"),
    pytest.param({"layer_norm_epsilon": True}, TypeError, "layer_norm_epsilon must be a real number", id="eps-bool"),
    pytest.param({"bias": "no"}, TypeError, "GPTConfig.bias must be True or False, got str 'no'", id="bias-str"),
    pytest.param({"bias": 1}, TypeError, "GPTConfig.bias must be True or False, got int 1", id="bias-int"),
    pytest.param({"bias": None}, TypeError, "GPTConfig.bias", id="bias-none"),
    pytest.param({"dropout": "0.1"}, TypeError, "GPTConfig.dropout must be a real number.*str '0.1'",
                 id="dropout-str"),
    pytest.param({"dropout": float("nan")}, ValueError, r"GPTConfig.dropout must be in \[0, 1\), got nan",
                 id="dropout-nan"),
    pytest.param({"dropout": -0.1}, ValueError, r"GPTConfig.dropout must be in \[0, 1\)", id="dropout-negative"),
    pytest.param({"dropout": 10**400}, ValueError, r"GPTConfig.dropout must be in \[0, 1\)", id="dropout-huge-int"),
    pytest.param({"n_layer": True}, TypeError, "GPTConfig.n_layer must be a positive int, got bool True",
                 id="n_layer-bool"),
    pytest.param({"n_embd": 32.0}, TypeError, "GPTConfig.n_embd must be a positive int, got float", id="n_embd-float"),
    pytest.param({"n_head": "4"}, TypeError, "GPTConfig.n_head must be a positive int, got str", id="n_head-str"),
    pytest.param({"block_size": -10**5000}, ValueError, "GPTConfig.block_size must be a positive int, got an int of",
                 id="block_size-past-repr"),
])
# fmt: on
def test_every_config_field_is_checked_with_its_name(kwargs, error, words):
    with pytest.raises(error, match=words):
        small_config(**kwargs)


def test_config_accepts_what_gpt2_configs_hold():
    """Ints where a float is expected (a JSON 0 for a dropout rate) are numbers too; the defaults are valid."""
    cfg = small_config(dropout=0, layer_norm_epsilon=1, bias=False)
    assert (cfg.dropout, cfg.layer_norm_epsilon, cfg.bias) == (0, 1, False)
    assert GPTConfig().to_dict() == {"block_size": 256, "vocab_size": 260, "n_layer": 4, "n_head": 4, "n_embd": 128,
                                     "dropout": 0.0, "bias": True, "layer_norm_epsilon": 1e-5}


# ------------------------------------------------------------------ checkpoints that cannot be loaded as they are
def _saved(tmp_path, seed: int = 10) -> tuple[GPT, object]:
    torch.manual_seed(seed)
    model = GPT(small_config()).eval()
    model.save_pretrained(tmp_path)
    return model, tmp_path


@pytest.mark.parametrize("values", [[float("nan")], [float("inf"), float("nan"), -float("inf")]])
def test_from_pretrained_refuses_non_finite_weights_naming_file_tensor_and_count(tmp_path, values):
    from safetensors.torch import load_file, save_file

    _saved(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    w = tensors["transformer.h.1.mlp.c_fc.weight"]
    w.view(-1)[torch.arange(len(values)) * 7] = torch.tensor(values)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError) as info:
        GPT.from_pretrained(tmp_path)
    message = str(info.value)
    assert "'transformer.h.1.mlp.c_fc.weight'" in message and str(path) in message
    assert f"has {len(values)} NaN or inf values (of {w.numel()})" in message


def test_from_pretrained_refuses_integer_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    _saved(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    tensors["transformer.ln_f.bias"] = tensors["transformer.ln_f.bias"].long()
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'transformer.ln_f.bias' in .*model.safetensors has dtype torch.int64"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.999, 4 / 10**6])
def test_from_pretrained_truncated_weights_are_a_value_error_naming_the_file(tmp_path, keep):
    _saved(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} is not a valid safetensors file"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("key", ["n_positions", "vocab_size", "n_layer", "n_head", "n_embd"])
def test_from_pretrained_config_without_a_required_key(tmp_path, key):
    _saved(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    del config[key]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(f"{config_path} lacks ['{key}']")):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("text, words", [
    ("{not json", "is not valid JSON"),
    ('{"model_type": "gpt2"', "is not valid JSON"),
    (b"\xff\xfe{}", "is not valid JSON"),  # not UTF-8
    ("[1, 2]", "must hold a JSON object, got a list"),
])  # fmt: skip
def test_from_pretrained_corrupt_config_names_the_file(tmp_path, text, words):
    _saved(tmp_path)
    config_path = tmp_path / "config.json"
    if isinstance(text, bytes):
        config_path.write_bytes(text)
    else:
        config_path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{config_path} {words}")):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("key, value, words", [
    ("layer_norm_epsilon", float("nan"), "GPTConfig.layer_norm_epsilon must be a finite number > 0"),
    ("n_embd", "32", "GPTConfig.n_embd must be a positive int, got str"),
    ("n_positions", 0, "GPTConfig.block_size must be a positive int, got 0"),
    ("n_layer", True, "GPTConfig.n_layer must be a positive int, got bool"),
    ("resid_pdrop", "0.1", "resid_pdrop must be a finite number, got '0.1'"),
    ("attn_pdrop", float("nan"), "attn_pdrop must be a finite number, got nan"),
    ("resid_pdrop", 1.0, r"GPTConfig.dropout must be in \[0, 1\)"),
])  # fmt: skip
def test_from_pretrained_config_values_are_checked_naming_the_file(tmp_path, key, value, words):
    """json.dumps writes NaN, and Python's json reads it back: a config.json can hold one."""
    _saved(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    if key == "resid_pdrop" and not isinstance(value, str):  # one rate for all three, so only the range is wrong
        config.update(resid_pdrop=value, embd_pdrop=value, attn_pdrop=value)
    else:
        config[key] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=words) as info:
        GPT.from_pretrained(tmp_path)
    assert str(config_path) in str(info.value)


def _write_sharded(directory, seed: int) -> tuple[GPT, list[str]]:
    """A two-shard checkpoint of another model, laid out as transformers writes one (an index and its shards)."""
    from safetensors.torch import load_file, save_file

    other, _ = _saved(directory, seed=seed)
    tensors = load_file(str(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    keys = sorted(tensors)
    parts = {names[0]: keys[: len(keys) // 2], names[1]: keys[len(keys) // 2:]}
    for name, part in parts.items():
        save_file({k: tensors[k] for k in part}, str(directory / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, part in parts.items() for k in part}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return other, names


def test_save_pretrained_over_a_sharded_save_removes_its_index_and_shards_only(tmp_path):
    other, shards = _write_sharded(tmp_path, seed=11)
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(GPT.from_pretrained(tmp_path).eval()(idx)[0], other(idx)[0])  # the shards load
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "unlisted.safetensors").write_bytes(b"not listed by the index")
    torch.manual_seed(12)
    model = GPT(small_config()).eval()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "notes.txt",
                                                           "unlisted.safetensors"]
    with torch.no_grad():
        assert torch.equal(GPT.from_pretrained(tmp_path).eval()(idx)[0], model(idx)[0])  # the new weights, not shards
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
        assert_close(hf(idx).logits, model(idx)[0], "interop")


def test_save_pretrained_never_deletes_outside_the_directory_or_the_new_file(tmp_path):
    """An index is data: a name that leads elsewhere, or model.safetensors itself, is never deleted."""
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"keep")
    (directory / "sub").mkdir()
    (directory / "sub" / "inner.safetensors").write_bytes(b"keep")
    weight_map = {"a": "../outside.safetensors", "b": "sub/inner.safetensors", "c": "model.safetensors",
                  "d": "shard.safetensors", "e": 7}
    (directory / "shard.safetensors").write_bytes(b"listed: removed")
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model, _ = _saved(directory)
    assert not (directory / "model.safetensors.index.json").exists() and not (directory / "shard.safetensors").exists()
    assert (tmp_path / "outside.safetensors").read_bytes() == b"keep"
    assert (directory / "sub" / "inner.safetensors").read_bytes() == b"keep"
    idx = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        assert torch.equal(GPT.from_pretrained(directory).eval()(idx)[0], model(idx)[0])


def test_save_pretrained_removes_an_unreadable_index_and_keeps_its_shards(tmp_path):
    _saved(tmp_path / "elsewhere")
    (tmp_path / "config.json").write_text((tmp_path / "elsewhere" / "config.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text("{broken")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"unknown to us")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'model.safetensors.index.json'} is not valid JSON")):
        GPT.from_pretrained(tmp_path)
    model, _ = _saved(tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert (tmp_path / "model-00001-of-00002.safetensors").read_bytes() == b"unknown to us"
    idx = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        assert torch.equal(GPT.from_pretrained(tmp_path).eval()(idx)[0], model(idx)[0])
