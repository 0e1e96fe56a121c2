"""Bad input gets a clear error: one table of cases across the public API, so the next case is one line.

Each row: a call that must fail → the exception type → a word the message must contain (the argument, file or
field it names). A ValueError or TypeError that names what was wrong is the contract; a raw IndexError or an
allocator error is not, and a silent wrong result is worst of all. Rows marked `unchanged` also check that the
failed call left the model as it was. Deeper tables live beside their modules (tests/test_config.py for every
config field, tests/test_nf4.py for NF4Weight fields, tests/test_kernels.py for the kernel switch).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models

from minipeft import cli, kernels
from minipeft.model import GPT, GPTConfig, KVCache
from minipeft.quant import (
    NF4Linear,
    dequantize_nf4,
    int8_nbytes,
    merge_and_requantize,
    nf4_nbytes,
    quantize_model,
    quantize_nf4,
    weight_bytes_report,
)
from minipeft.tokenizer import ByteTokenizer, load_tokenizer_json
from minipeft.train import TrainConfig, train
from minipeft.tuners import (
    AdapterConfig,
    Fuse,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    combine_lora,
    get_peft_model,
)
from minipeft.tuners.io import COMPOSITION_NAME, CONFIG_NAME, WEIGHTS_NAME, write_adapter

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=32)
IDX = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def reference_kernels():
    with kernels.use_backend("reference"):
        yield


def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).eval()


def lora(**kw) -> PeftModel:
    return get_peft_model(gpt(), LoraConfig(r=2, target_modules=["c_attn"], **kw))


def merged() -> PeftModel:
    pm = lora(init_lora_weights=False)
    pm.merge_adapter()
    return pm.train()


def with_bottleneck() -> PeftModel:
    pm = lora()
    pm.add_adapter("b", AdapterConfig())
    return pm


def saved_adapter(tmp_path, edit_config=None, edit_tensors=None) -> str:
    """A LoRA adapter directory; `edit_config` / `edit_tensors` rewrite its files (and drop any manifest, as a
    directory written by hand or by another tool would have none)."""
    pm = lora(init_lora_weights=False)
    pm.save_adapter(tmp_path)
    for extra in set(p.name for p in tmp_path.iterdir()) - {CONFIG_NAME, WEIGHTS_NAME}:
        (tmp_path / extra).unlink()
    if edit_config is not None:
        raw = json.loads((tmp_path / CONFIG_NAME).read_text())
        edit_config(raw)
        (tmp_path / CONFIG_NAME).write_text(json.dumps(raw))  # json writes NaN as the literal NaN
    if edit_tensors is not None:
        tensors = dict(pm.adapter_state_dict("default"))
        edit_tensors(tensors)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / WEIGHTS_NAME)
    return str(tmp_path)


def nan_in_lora_B(tensors):
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")


def nan_in_adapter(pm: PeftModel) -> PeftModel:
    """`pm` with one NaN in the first LoRA B factor (a diverged adapter)."""
    with torch.no_grad():
        next(p for n, p in pm.named_parameters() if "lora_B" in n)[0, 0] = math.nan
    return pm


def set_field(key, value):
    return lambda raw: raw.__setitem__(key, value)


def cli_usage_error(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    raise ValueError("usage error, rc 2")  # so the row reads like every other


def fused() -> PeftModel:
    """Bottleneck adapters "a" and "b" under an active dynamic fusion."""
    pm = get_peft_model(gpt(), AdapterConfig(), adapter_name="a")
    pm.add_adapter("b", AdapterConfig())
    pm.add_adapter_fusion(["a", "b"])
    pm.set_adapter(Fuse("a", "b"))
    return pm


def with_bias(value: float) -> GPT:
    model = gpt()
    model.transformer.h[0].mlp.c_fc.bias.data[0] = value
    return model


def lora_files(edit=None) -> tuple:
    """write_adapter's (config, tensors) for a LoRA adapter, through `edit(config, tensors)` when given."""
    pm = lora()
    config, tensors = pm.peft_config["default"], pm.adapter_state_dict("default")
    return (config, tensors) if edit is None else edit(config, tensors)


def gpt2_dir(t, n_layer: int | None = None, tie: bool | None = None, untie: bool = False) -> str:
    """A checkpoint as a tool other than minipeft writes it (no minipeft metadata), its config.json then edited."""
    model = gpt()
    if untie:
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    model.save_pretrained(t)
    save_file(load_file(t / "model.safetensors"), t / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((t / "config.json").read_text())
    raw.update({k: v for k, v in (("n_layer", n_layer), ("tie_word_embeddings", tie)) if v is not None})
    (t / "config.json").write_text(json.dumps(raw))
    return str(t)


def hf_tokenizer(t, tokenizer_config: str | None = None):
    """A two-word tokenizer.json (and tokenizer_config.json) in `t`, loaded."""
    Tokenizer(models.WordLevel({"a": 0, "<|endoftext|>": 1}, unk_token="a")).save(str(t / "tokenizer.json"))
    if tokenizer_config is not None:
        (t / "tokenizer_config.json").write_text(tokenizer_config)
    return load_tokenizer_json(t)


def packed_pair():
    """Two LoRA adapters (ranks 1 and 2) of a 4 → 3 layer, packed."""
    return kernels.pack_adapters([torch.ones(1, 4), torch.ones(2, 4)], [torch.ones(3, 1), torch.ones(3, 2)], [1.0, 2.0])


# (id, call, exception, word). `t` is a fresh temporary directory.
CASES = [
    # ---- configs (every field: tests/test_config.py)
    ("lora_alpha str", lambda t: LoraConfig(lora_alpha="16"), TypeError, "lora_alpha"),
    ("lora_alpha nan", lambda t: LoraConfig(lora_alpha=math.nan), ValueError, "lora_alpha"),
    ("lora_dropout str", lambda t: LoraConfig(lora_dropout="0.1"), TypeError, "lora_dropout"),
    ("target_modules int", lambda t: LoraConfig(target_modules=5), TypeError, "target_modules"),
    ("use_rslora str", lambda t: LoraConfig(use_rslora="no"), TypeError, "use_rslora"),
    ("r too large for a layer", lambda t: get_peft_model(gpt(), LoraConfig(r=10**12)), ValueError, "exceeds the rank"),
    ("train lr nan", lambda t: TrainConfig(lr=math.nan), ValueError, "lr"),
    ("train lr 0", lambda t: TrainConfig(lr=0), ValueError, "lr"),
    # ---- adapter files
    ("json lora_alpha str", lambda t: lora().load_adapter(saved_adapter(t, set_field("lora_alpha", "16")), "x"),
     ValueError, CONFIG_NAME),
    ("json lora_alpha NaN", lambda t: lora().load_adapter(saved_adapter(t, set_field("lora_alpha", math.nan)), "x"),
     ValueError, "lora_alpha"),
    ("json target_modules int", lambda t: lora().load_adapter(saved_adapter(t, set_field("target_modules", 5)), "x"),
     ValueError, "target_modules"),
    ("NaN tensor in file", lambda t: lora().load_adapter(saved_adapter(t, edit_tensors=nan_in_lora_B), "x"),
     ValueError, "NaN"),
    ("NaN tensor written", lambda t: lora().load_adapter_state_dict(
        "default", {k: v * math.nan for k, v in lora().adapter_state_dict("default").items()}), ValueError, "NaN"),
    ("pickle only", lambda t: (t / "adapter_model.bin").write_bytes(b"x") and lora().load_adapter(t, "x"),
     ValueError, "pickle"),
    ("no directory", lambda t: lora().load_adapter(t / "missing", "x"), ValueError, "does not exist"),
    ("save a NaN adapter", lambda t: nan_in_adapter(lora()).save_adapter(t), ValueError, "nothing was written"),
    ("save_pretrained a NaN adapter", lambda t: nan_in_adapter(lora()).save_pretrained(t), ValueError, "NaN"),
    ("save_pretrained unloaded", lambda t: (lambda pm: (pm.unload(), pm.save_pretrained(t)))(lora()), ValueError,
     "no adapters to save"),
    # ---- inputs to forward and generate
    ("1-D input, prompt", lambda t: get_peft_model(gpt(), PromptTuningConfig(num_virtual_tokens=2))(IDX[0]),
     ValueError, "(B, T)"),
    ("1-D input, prefix", lambda t: get_peft_model(gpt(), PrefixTuningConfig(num_virtual_tokens=2))(IDX[0]),
     ValueError, "(B, T)"),
    ("T = 0", lambda t: gpt()(IDX[:, :0], targets=IDX[:, :0]), ValueError, "T >= 1"),
    ("targets out of vocab", lambda t: gpt()(IDX, targets=IDX + 64), ValueError, "targets"),
    ("targets float", lambda t: gpt()(IDX, targets=IDX.float()), TypeError, "targets"),
    ("targets all ignored", lambda t: gpt()(IDX, targets=torch.full_like(IDX, -100)), ValueError, "-100"),
    ("idx out of vocab", lambda t: gpt()(IDX + 64), ValueError, "vocab_size"),
    ("too long with prompt", lambda t: get_peft_model(gpt(), PromptTuningConfig(num_virtual_tokens=4))(
        torch.zeros(1, 30, dtype=torch.long)), ValueError, "num_virtual_tokens"),
    ("max_new_tokens float", lambda t: gpt().generate(IDX, max_new_tokens=2.0), TypeError, "max_new_tokens"),
    ("top_k float", lambda t: gpt().generate(IDX, 2, do_sample=True, top_k=2.0), TypeError, "top_k"),
    ("eos_token_id float", lambda t: gpt().generate(IDX, 2, eos_token_id=3.0), TypeError, "eos_token_id"),
    ("eos_token_id out of range", lambda t: gpt().generate(IDX, 2, eos_token_id=10**6), ValueError, "eos_token_id"),
    ("temperature nan", lambda t: gpt().generate(IDX, 2, do_sample=True, temperature=math.nan), ValueError,
     "temperature"),
    ("right-padded generate", lambda t: gpt().generate(IDX, 2, attention_mask=torch.tensor([[1] * 4 + [0] * 2] * 2)),
     ValueError, "left padding"),
    ("inputs_embeds NaN", lambda t: gpt()(inputs_embeds=torch.full((1, 3, 32), math.nan)), ValueError, "inputs_embeds"),
    ("inputs_embeds list", lambda t: gpt()(inputs_embeds=[[[0.0] * 32]]), TypeError, "inputs_embeds"),
    ("prompt_embeds NaN", lambda t: gpt()(IDX, prompt_embeds=torch.full((2, 32), math.nan)), ValueError,
     "prompt_embeds"),
    ("prompt_embeds list", lambda t: gpt()(IDX, prompt_embeds=[[0.0] * 32]), TypeError, "prompt_embeds"),
    ("prompt_mask list", lambda t: gpt()(IDX, prompt_embeds=torch.zeros(2, 2, 32), prompt_mask=[[True] * 2] * 2),
     TypeError, "prompt_mask"),
    ("prompt_mask alone", lambda t: gpt()(IDX, prompt_mask=torch.ones(2, 2, dtype=torch.bool)), ValueError,
     "prompt_mask"),
    ("attention_mask of 2s", lambda t: gpt()(IDX, attention_mask=torch.full_like(IDX, 2)), ValueError,
     "attention_mask"),
    ("attention_mask of 0.5s", lambda t: gpt()(IDX, attention_mask=torch.full(IDX.shape, 0.5)), ValueError,
     "attention_mask"),
    ("kv_cache str", lambda t: gpt()(IDX, kv_cache="x"), TypeError, "kv_cache"),
    ("kv_cache of another batch", lambda t: gpt()(IDX, kv_cache=KVCache(2, 3)), ValueError, "kv_cache"),
    ("kv_cache of more layers", lambda t: gpt()(IDX, kv_cache=KVCache(5, 2)), ValueError, "n_layer"),
    ("KVCache no layers", lambda t: KVCache(0, 1), ValueError, "n_layer"),
    ("KVCache str layers", lambda t: KVCache("a", 2), TypeError, "n_layer"),
    ("KVCache batch -1", lambda t: KVCache(2, -1), ValueError, "batch_size"),
    ("KVCache.from_prefix empty", lambda t: KVCache.from_prefix([], []), ValueError, "one tensor per layer"),
    ("generate 1-D prompt_embeds", lambda t: gpt().generate(IDX, 2, prompt_embeds=torch.zeros(8)), ValueError,
     "prompt_embeds"),
    ("generate kv_cache str", lambda t: gpt().generate(IDX, 2, kv_cache="x"), TypeError, "kv_cache"),
    ("greedy with top_k", lambda t: gpt().generate(IDX, 2, top_k=3), ValueError, "do_sample"),
    ("greedy with temperature", lambda t: gpt().generate(IDX, 2, temperature=0.5), ValueError, "do_sample"),
    # ---- whole-model checkpoints (GPT.save_pretrained / from_pretrained)
    ("checkpoint of more layers", lambda t: GPT.from_pretrained(gpt2_dir(t, n_layer=1)), ValueError, "no place for"),
    ("untied head, config tied", lambda t: GPT.from_pretrained(gpt2_dir(t, tie=True, untie=True)), ValueError,
     "tie_word_embeddings"),
    ("save a NaN GPT", lambda t: (lambda m: (m.transformer.wte.weight.data.fill_(math.nan), m.save_pretrained(t)))(
        gpt()), ValueError, "nothing was written"),
    # ---- the adapter state machine (tests/test_adapter_states.py runs random sequences)
    ("second wrapper", lambda t: (lambda pm: get_peft_model(pm.base_model, LoraConfig(r=1)))(lora()), ValueError,
     "already wrapped"),
    ("second wrapper, input method", lambda t: (lambda pm: get_peft_model(pm.base_model, LoraConfig(r=1)))(
        get_peft_model(gpt(), PromptTuningConfig(num_virtual_tokens=2))), ValueError, "already wrapped"),
    ("merge inactive", lambda t: with_bottleneck().merge_adapter(["x"]), ValueError, "does not exist"),
    ("merge bottleneck", lambda t: with_bottleneck().merge_adapter(["b"]), ValueError, "LoRA adapters only"),
    ("merge nothing active", lambda t: (lambda pm: (pm.set_adapter("b"), pm.merge_adapter()))(with_bottleneck()),
     ValueError, "nothing to merge"),
    ("merge a NaN adapter", lambda t: nan_in_adapter(lora()).merge_adapter(), ValueError, "lora_B holds NaN"),
    ("merge_and_unload a NaN adapter", lambda t: nan_in_adapter(lora()).merge_and_unload(), ValueError,
     "lora_B holds NaN"),
    ("merge_adapter one str", lambda t: lora().merge_adapter("default"), TypeError, "['default']"),
    ("merge_and_unload one str", lambda t: lora().merge_and_unload("default"), TypeError, "adapter_names"),
    ("add_weighted_adapter one str", lambda t: lora().add_weighted_adapter("default", [1.0], "x"), TypeError,
     "adapters must be a list"),
    ("add_weighted_adapter one weight", lambda t: lora().add_weighted_adapter(["default"], 1.0, "x"), TypeError,
     "weights"),
    ("delete_adapter a list", lambda t: lora().delete_adapter(["default"]), TypeError, "adapter_name"),
    ("save_pretrained to a file", lambda t: (t / "f").write_text("x") and lora().save_pretrained(t / "f"), ValueError,
     "directory"),
    ("train while merged", lambda t: merged()(IDX, targets=IDX), ValueError, "unmerge_adapter"),
    ("trainer while merged", lambda t: train(merged(), lambda g: (IDX, IDX, None), TrainConfig(steps=1)),
     ValueError, "unmerge_adapter"),
    ("save_pretrained typo keyword", lambda t: lora().save_pretrained(t, fromat="peft"), TypeError, "fromat"),
    ("save_pretrained base path, minipeft format", lambda t: lora().save_pretrained(t, base_model_name_or_path="gpt2"),
     ValueError, "base_model_name_or_path"),
    ("write_adapter NaN", lambda t: write_adapter(t, *lora_files(lambda c, sd: (c, {k: v * math.nan for k, v in
                                                                                   sd.items()}))), ValueError, "NaN"),
    ("write_adapter no base", lambda t: write_adapter(t, *lora_files(
        lambda c, sd: (dataclasses.replace(c, base_model=None), sd))), ValueError, "base_model"),
    ("write_adapter tensors list", lambda t: write_adapter(t, lora_files()[0], [1, 2]), TypeError, "tensors"),
    ("write_adapter config dict", lambda t: write_adapter(t, lora_files()[0].to_dict(), lora_files()[1]), TypeError,
     "config"),
    ("fusion loss weight NaN", lambda t: fused().fusion_regularization_loss(weight=math.nan), ValueError, "weight"),
    ("fusion loss weight str", lambda t: fused().fusion_regularization_loss(weight="x"), TypeError, "weight"),
    ("fusion_attention average str", lambda t: fused().fusion_attention(average="no"), TypeError, "average"),
    ("combine_lora NaN weight", lambda t: combine_lora([(torch.ones(2, 4), torch.ones(3, 2), 1.0)], [math.nan]),
     ValueError, "weights[0]"),
    ("combine_lora str weight", lambda t: combine_lora([(torch.ones(2, 4), torch.ones(3, 2), 1.0)], ["a"]),
     TypeError, "weights[0]"),
    ("combine_lora nothing", lambda t: combine_lora([], [], "linear"), ValueError, "factors"),
    ("checkpoint_dir is a file", lambda t: (t / "f").write_text("x") and train(
        lora(), lambda g: (IDX, IDX, None), TrainConfig(steps=1), checkpoint_dir=t / "f"), ValueError,
     "checkpoint_dir"),
    # ---- kernels and NF4 (more: tests/test_kernels.py, tests/test_nf4.py)
    ("scaling nan", lambda t: kernels.lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(1, 4),
                                                  torch.randn(3, 1), math.nan), ValueError, "scaling"),
    ("backend unknown", lambda t: kernels.set_backend("cuda"), ValueError, "backend"),
    ("gather_adapters list", lambda t: kernels.gather_adapters([torch.ones(1, 4)], torch.zeros(2, dtype=torch.long)),
     TypeError, "adapters"),
    ("gather_adapters float index", lambda t: kernels.gather_adapters(packed_pair(), torch.zeros(2)), TypeError,
     "adapter_index"),
    ("multi_lora_route index shape", lambda t: kernels.multi_lora_route(torch.randn(3, 2, 4),
                                                                        torch.zeros(2, dtype=torch.long),
                                                                        packed_pair()), ValueError, "adapter_index"),
    ("int8 threshold 10**400", lambda t: kernels.int8_linear(torch.randn(2, 4), torch.ones(3, 4, dtype=torch.int8),
                                                             torch.ones(3), None, 10**400), ValueError, "threshold"),
    ("quantize NaN weight", lambda t: quantize_nf4(torch.tensor([1.0, math.nan] * 32)), ValueError, "NaN"),
    ("quantize_model inf", lambda t: quantize_model(
        (lambda m: (m.transformer.h[0].mlp.c_fc.weight.data.fill_(math.inf), m)[1])(gpt())), ValueError, "c_fc"),
    ("double quant overflow", lambda t: quantize_nf4(torch.full((64 * 256,), 3e38)), ValueError, "double"),
    ("dequantize short codes", lambda t: dequantize_nf4(
        (lambda q: (setattr(q, "codes", q.codes[:-100]), q)[1])(quantize_nf4(torch.randn(64, 64)))), ValueError,
     "codes"),
    ("dequantize int64 codes", lambda t: dequantize_nf4(
        (lambda q: (setattr(q, "codes", q.codes.long()), q)[1])(quantize_nf4(torch.randn(64, 64)))), ValueError,
     "codes"),
    ("quantize_model NaN bias", lambda t: quantize_model(with_bias(math.nan)), ValueError, "c_fc.bias"),
    ("quantize_model int8 inf bias", lambda t: quantize_model(with_bias(math.inf), bits=8), ValueError, "c_fc.bias"),
    ("NF4Linear NaN bias", lambda t: NF4Linear.from_linear(with_bias(math.nan).transformer.h[0].mlp.c_fc),
     ValueError, "linear.bias"),
    ("merge_and_requantize a GPT", lambda t: merge_and_requantize(gpt(), IDX), TypeError, "PeftModel"),
    ("nf4_nbytes blocksize 0", lambda t: nf4_nbytes(100, 0), ValueError, "blocksize"),
    ("nf4_nbytes negative", lambda t: nf4_nbytes(-100), ValueError, "numel"),
    ("int8_nbytes negative", lambda t: int8_nbytes(-1, 5), ValueError, "out_features"),
    ("weight_bytes_report blocksize 0", lambda t: weight_bytes_report(gpt(), blocksize=0), ValueError, "blocksize"),
    ("weight_bytes_report blocksize 7", lambda t: weight_bytes_report(gpt(), blocksize=7), ValueError, "blocksize"),
    ("dequantize int dtype", lambda t: dequantize_nf4(quantize_nf4(torch.randn(64, 64)), dtype=torch.int64),
     (TypeError, ValueError), "dtype"),
    # ---- tokenizers
    ("tokenizer_config.json a list", lambda t: hf_tokenizer(t, "[]"), ValueError, "tokenizer_config.json"),
    ("token_to_str 300", lambda t: ByteTokenizer().token_to_str(300), ValueError, "300"),
    ("token_to_str -1", lambda t: ByteTokenizer().token_to_str(-1), ValueError, "-1"),
    ("HF decode -1", lambda t: hf_tokenizer(t).decode([-1]), ValueError, "-1"),
    ("HF decode out of vocab", lambda t: hf_tokenizer(t).decode([99]), ValueError, "99"),
    ("byte decode float id", lambda t: ByteTokenizer().decode([104.9]), TypeError, "104.9"),
    ("encode add_bos str", lambda t: ByteTokenizer().encode("hi", add_bos="no"), TypeError, "add_bos"),
    # ---- the command line: one line, exit code 2, before any work
    ("cli temperature nan", lambda t: cli_usage_error(["generate", "hi", "--temperature", "nan"]), ValueError, "rc 2"),
    ("cli lr 0", lambda t: cli_usage_error(["finetune", "--method", "lora", "--lr", "0"]), ValueError, "rc 2"),
    ("cli temperature, greedy", lambda t: cli_usage_error(["generate", "hi", "--temperature", "0.5"]), ValueError,
     "rc 2"),
    ("cli top-k, greedy", lambda t: cli_usage_error(["generate", "hi", "--top-k", "5"]), ValueError, "rc 2"),
]


@pytest.mark.parametrize(("call", "exception", "word"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(call, exception, word, tmp_path):
    with pytest.raises(exception, match=None) as e:
        call(tmp_path)
    assert word in str(e.value), f"{type(e.value).__name__}: {e.value}"


def fingerprint(pm: PeftModel) -> tuple:
    state = {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest()
             for k, v in pm.state_dict().items()}
    return pm.active_adapters, pm.merged_adapters, list(pm.peft_config), state


@pytest.mark.parametrize("call", [
    lambda pm: pm.merge_adapter(["b"]),
    lambda pm: pm.load_adapter_state_dict("default", {k: v * math.nan for k, v in
                                                      pm.adapter_state_dict("default").items()}),
    lambda pm: pm.set_adapter(["default", "nope"]),
    lambda pm: pm.add_adapter("c", LoraConfig(r=10**12)),
    lambda pm: pm.add_adapter("c", LoraConfig(target_modules=["nope"])),
    lambda pm: pm(IDX, targets=IDX + 64),
], ids=["merge bottleneck", "NaN tensors", "unknown name", "r too large", "unknown target", "bad targets"])
def test_a_refused_call_changes_nothing(call):
    pm = with_bottleneck()
    before = fingerprint(pm)
    with pytest.raises((ValueError, TypeError)):
        call(pm)
    assert fingerprint(pm) == before
    assert copy.deepcopy(pm)(IDX)[0].shape == (2, 6, 64)  # still usable


def test_a_released_base_can_be_wrapped_again():
    """One base, one wrapper, while the wrapper lives: unload() (or merge_and_unload) releases the base."""
    pm = get_peft_model(gpt(), PromptTuningConfig(num_virtual_tokens=2))
    base = pm.unload()
    assert get_peft_model(base, LoraConfig(r=1)).base_model is base


def test_a_refused_first_adapter_leaves_the_model_free_and_unfrozen():
    model = gpt().train()
    with pytest.raises(ValueError, match="not found") as refused:
        get_peft_model(model, LoraConfig(target_modules=["nope"]))
    assert refused.value is not None  # the traceback (and the half-built PeftModel in it) is still alive here
    assert all(p.requires_grad for p in model.parameters())
    assert get_peft_model(model, LoraConfig(r=1)).base_model is model


def test_a_nan_adapter_is_neither_merged_nor_written(tmp_path):
    """A refused merge leaves the base weights and the adapters as they were; a refused save writes no file."""
    pm = nan_in_adapter(lora())
    before = fingerprint(pm)
    for call in (pm.merge_adapter, pm.merge_and_unload, lambda: pm.save_pretrained(tmp_path / "out")):
        with pytest.raises(ValueError, match="NaN"):
            call()
        assert fingerprint(pm) == before
    assert not (tmp_path / "out").exists()


def test_a_refused_save_pretrained_leaves_the_earlier_save_whole(tmp_path):
    """Two LoRA adapters and their composition saved; then a save that cannot be written in the peft format
    (a bottleneck adapter has none) is refused before it writes, so the directory still holds the first save."""
    first = lora()
    first.add_adapter("b", LoraConfig(r=1, target_modules=["c_attn"]))
    first.set_adapter(["default", "b"])
    first.save_pretrained(tmp_path, format="peft")
    files = {p.relative_to(tmp_path): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert any(p.name == "adapter_composition.json" for p in files)
    second = get_peft_model(gpt(), LoraConfig(r=4, target_modules=["c_attn"]))
    second.add_adapter("b", AdapterConfig())
    with pytest.raises(ValueError, match="HF peft has no format"):
        second.save_pretrained(tmp_path, format="peft")
    assert {p.relative_to(tmp_path): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == files


def test_names_may_be_any_iterable_but_a_bare_str():
    """dict keys, tuples and generators name adapters as a list does; merging them merges the same adapters."""
    pm = lora(init_lora_weights=False)
    pm.merge_adapter(pm.peft_config.keys())
    assert pm.merged_adapters == ["default"]
    pm.unmerge_adapter()
    pm.merge_adapter(n for n in ("default",))
    assert pm.merged_adapters == ["default"]


def files_in(directory) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kwargs", [dict(fromat="peft"), dict(base_model_name_or_path="gpt2"),
                                    dict(format="peft", base_model_name_or_path=5)])
def test_a_refused_keyword_leaves_the_earlier_save_and_its_composition(tmp_path, kwargs):
    """save_pretrained checks its keywords before it removes the earlier save's adapter_composition.json."""
    first = lora()
    first.add_adapter("b", LoraConfig(r=1, target_modules=["c_attn"]))
    first.set_adapter(["default", "b"])
    first.save_pretrained(tmp_path)
    before = files_in(tmp_path)
    assert any(p.name == COMPOSITION_NAME for p in before)
    with pytest.raises((TypeError, ValueError)):
        first.save_pretrained(tmp_path, **kwargs)
    assert files_in(tmp_path) == before


def test_a_gpt_save_killed_between_its_two_files_is_refused(tmp_path, monkeypatch):
    """New weights beside the old config.json (same shapes, another layer_norm_epsilon) would load silently
    under the wrong config; the weights record the config they were saved with, so the pair is refused."""
    torch.manual_seed(0)
    GPT(CFG).save_pretrained(tmp_path)
    newer = GPT(dataclasses.replace(CFG, layer_norm_epsilon=1e-3))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies after model.safetensors, before config.json

    monkeypatch.setattr("minipeft.model.save_json", killed)
    with pytest.raises(KeyboardInterrupt):
        newer.save_pretrained(tmp_path)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="layer_norm_epsilon.*not one save's"):
        GPT.from_pretrained(tmp_path)
    newer.save_pretrained(tmp_path)  # a save that completes repairs the directory
    assert GPT.from_pretrained(tmp_path).config.layer_norm_epsilon == 1e-3


def test_a_nan_gpt_is_not_saved_over_a_good_one(tmp_path):
    gpt().save_pretrained(tmp_path)
    before = files_in(tmp_path)
    model = gpt()
    model.transformer.h[1].mlp.c_proj.bias.data[3] = math.inf
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_proj\.bias.*nothing was written"):
        model.save_pretrained(tmp_path)
    assert files_in(tmp_path) == before


def test_from_pretrained_loads_gpt2_mask_buffers_and_a_stored_copy_of_the_tied_head(tmp_path):
    """What GPT-2 checkpoints legitimately hold beyond the weights: attn.bias / attn.masked_bias (the causal mask
    older transformers saved) and an lm_head.weight equal to wte under tie_word_embeddings."""
    model = gpt()
    tensors = load_file(gpt2_dir(tmp_path) + "/model.safetensors")
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    tensors.update({f"h.{i}.attn.bias": torch.ones(1, 1, 32, 32).tril() for i in range(CFG.n_layer)})
    tensors["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert torch.equal(GPT.from_pretrained(tmp_path).eval()(IDX)[0], model(IDX)[0])
    tensors["h.2.attn.bias"] = torch.ones(1, 1, 32, 32).tril()  # a mask buffer of a layer the config lacks
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no place for.*h\.2\.attn\.bias"):
        GPT.from_pretrained(tmp_path)


def test_tokenizers_agree_on_ids_they_cannot_decode(tmp_path):
    """ByteTokenizer and an HF tokenizer.json refuse the same kinds of ids; ints of any kind still decode."""
    byte, hf = ByteTokenizer(), hf_tokenizer(tmp_path)
    for tok in (byte, hf):
        for bad, error in (([tok.vocab_size], ValueError), ([-1], ValueError), ([1.0], TypeError), ([True], TypeError)):
            with pytest.raises(error, match="token id"):
                tok.decode(bad)
    assert byte.decode(torch.tensor([104, 105])) == byte.decode([104, 105]) == "hi"
    assert hf.decode(torch.tensor([0])) == hf.decode([0]) == "a"


def test_cli_generate_says_when_max_new_tokens_is_cut(tmp_path, capsys):
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=260, block_size=16)).save_pretrained(tmp_path)
    assert cli.main(["generate", "--base", str(tmp_path), "--device", "cpu", "hello", "--max-new-tokens", "500"]) == 0
    assert "--max-new-tokens 500 cut to 10" in capsys.readouterr().err
