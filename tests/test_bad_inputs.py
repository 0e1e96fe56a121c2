"""Bad input gets a clear error: one table of cases across the public API, so the next case is one line.

Each row: a call that must fail → the exception type → a word the message must contain (the argument, file or
field it names). A ValueError or TypeError that names what was wrong is the contract; a raw IndexError or an
allocator error is not, and a silent wrong result is worst of all. Rows marked `unchanged` also check that the
failed call left the model as it was. Deeper tables live beside their modules (tests/test_config.py for every
config field, tests/test_nf4.py for NF4Weight fields, tests/test_kernels.py for the kernel switch).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from minipeft import cli, kernels
from minipeft.model import GPT, GPTConfig
from minipeft.quant import dequantize_nf4, quantize_model, quantize_nf4
from minipeft.train import TrainConfig, train
from minipeft.tuners import (
    AdapterConfig,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)
from minipeft.tuners.io import CONFIG_NAME, WEIGHTS_NAME

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
    ("dequantize int dtype", lambda t: dequantize_nf4(quantize_nf4(torch.randn(64, 64)), dtype=torch.int64),
     (TypeError, ValueError), "dtype"),
    # ---- the command line: one line, exit code 2, before any work
    ("cli temperature nan", lambda t: cli_usage_error(["generate", "hi", "--temperature", "nan"]), ValueError, "rc 2"),
    ("cli lr 0", lambda t: cli_usage_error(["finetune", "--method", "lora", "--lr", "0"]), ValueError, "rc 2"),
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
