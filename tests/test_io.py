"""Adapter files (minipeft/tuners/io.py): round trips for every method, strict loading, atomic writes."""

from __future__ import annotations

import copy
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from tolerances import assert_close

from minipeft import kernels
from minipeft.model import GPT, GPTConfig
from minipeft.tuners import (
    AdapterConfig,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    get_peft_model,
)
from minipeft.tuners.io import CONFIG_NAME, WEIGHTS_NAME

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)

# Every method and variant; each adapter is perturbed after creation so a zero-init adapter cannot make a
# round trip pass by accident.
CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "mlp.c_proj"]),
    "lora_rslora_all_linear": lambda: LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", use_rslora=True),
    "pfeiffer": lambda: AdapterConfig.load("pfeiffer", reduction_factor=4),
    "houlsby": lambda: AdapterConfig.load("houlsby", reduction_factor=8, non_linearity="gelu"),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=4),
    "prompt_text": lambda: PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="TEXT",
                                              prompt_tuning_init_text="hi"),
    "ptuning_mlp": lambda: PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16),
    "ptuning_lstm": lambda: PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8,
                                          encoder_reparameterization_type="LSTM"),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=3),
    "prefix_projection": lambda: PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True,
                                                    encoder_hidden_size=16),
}


class _Bytes:
    """A toy tokenizer for the TEXT init (used at creation only, never saved)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


@pytest.fixture(autouse=True)
def reference_kernels():
    with kernels.use_backend("reference"):
        yield


@pytest.fixture(scope="module")
def base() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).eval()


def fresh(base: GPT) -> GPT:
    return copy.deepcopy(base)


def idx_batch() -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def perturb(pm: PeftModel, name: str) -> None:
    for value in pm.adapter_state_dict(name).values():
        value.add_(0.2 * torch.randn_like(value))


def make(base: GPT, method: str, name: str = "default") -> PeftModel:
    torch.manual_seed(2)
    pm = get_peft_model(fresh(base), CONFIGS[method](), adapter_name=name, tokenizer=_Bytes())
    perturb(pm, name)
    return pm.eval()


def base_state(model: GPT) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def base_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The base model's own tensors (copies), by their plain names, whatever wrappers are in place."""
    return {".".join(p for p in k.split(".") if p != "base_layer"): v.clone() for k, v in model.state_dict().items()
            if not any(s in k for s in ("lora_", "adapter_", "adapters."))}


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory) -> dict[str, tuple[str, torch.Tensor, dict]]:
    """Every method saved once: {method: (directory, logits, config dict)}."""
    out = {}
    with kernels.use_backend("reference"):  # module fixtures run outside the autouse function fixture
        out.update(_save_all(base, tmp_path_factory))
    return out


def _save_all(base, tmp_path_factory) -> dict[str, tuple[str, torch.Tensor, dict]]:
    out = {}
    for method in CONFIGS:
        pm = make(base, method)
        directory = tmp_path_factory.mktemp(method)
        pm.save_adapter(str(directory))
        with torch.no_grad():
            out[method] = (str(directory), pm(idx_batch())[0], pm.peft_config["default"].to_dict())
    return out


# ---------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("method", list(CONFIGS))
def test_round_trip_from_pretrained_identical_and_active(base, saved, method):
    directory, logits, config = saved[method]
    assert sorted(os.listdir(directory)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp file left behind
    assert json.loads(open(os.path.join(directory, CONFIG_NAME)).read()) == config
    assert config["method"] == CONFIGS[method]().method and config["base_model"] == CFG.to_dict()

    model = fresh(base)
    before = base_state(model)
    pm = PeftModel.from_pretrained(model, directory).eval()
    assert pm.active_adapters == ["default"]
    assert all(p.requires_grad for p in pm._adapter_parameters("default").values())
    assert pm.peft_config["default"].to_dict() == config
    with torch.no_grad():
        assert torch.equal(pm(idx_batch())[0], logits)
    assert all(torch.equal(before[k], v) for k, v in base_state(pm.unload()).items())  # base untouched


@pytest.mark.parametrize("method", list(CONFIGS))
def test_load_adapter_beside_another_is_not_activated(base, saved, method):
    directory, logits, config = saved[method]
    pm = get_peft_model(fresh(base), LoraConfig(r=2, target_modules=["c_fc"])).eval()
    perturb(pm, "default")
    with torch.no_grad():
        before = pm(idx_batch())[0]
    pm.load_adapter(directory, adapter_name="loaded")
    assert pm.active_adapters == ["default"]  # loading does not activate
    assert not any(p.requires_grad for p in pm._adapter_parameters("loaded").values())
    with torch.no_grad():
        assert torch.equal(pm(idx_batch())[0], before)
        pm.set_adapter("loaded")
        assert_close(pm(idx_batch())[0], logits)
    assert pm.peft_config["loaded"].to_dict() == config


def test_load_does_not_touch_base_weights_or_rng(base, saved):
    pm = get_peft_model(fresh(base), LoraConfig(r=2, target_modules=["c_fc"]))
    before = base_tensors(pm.base_model)
    torch.manual_seed(5)
    for method in ("lora", "pfeiffer", "prefix"):
        pm.load_adapter(saved[method][0], adapter_name=method)
    draw = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(draw, torch.rand(3))  # the adapters' init draws did not move the caller's RNG
    after = base_tensors(pm.base_model)
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())


def test_lora_loaded_into_the_same_layers_as_an_existing_adapter(base, saved):
    pm = get_peft_model(fresh(base), LoraConfig(r=3, target_modules=["c_attn"]))
    pm.load_adapter(saved["lora"][0], adapter_name="second")
    pm.set_adapter("second")
    with torch.no_grad():
        assert_close(pm.eval()(idx_batch())[0], saved["lora"][1])


# ---------------------------------------------------------------------------------------- refusing bad files
def copy_adapter(src: str, dst) -> str:
    dst.mkdir(exist_ok=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (dst / name).write_bytes(open(os.path.join(src, name), "rb").read())
    return str(dst)


def module_names(pm: PeftModel) -> list[str]:
    return [n for n, _ in pm.named_modules()]


def assert_unchanged(pm: PeftModel, names: list[str], configs: list[str]) -> None:
    assert module_names(pm) == names and list(pm.peft_config) == configs


def test_adapter_for_a_different_base_names_both_fingerprints(base, saved, tmp_path):
    other = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=64))
    pm = get_peft_model(other, LoraConfig(r=2, target_modules=["c_fc"]))
    names = module_names(pm)
    with pytest.raises(ValueError, match=r"different base model \(n_layer: file 2 vs model 3\)") as e:
        pm.load_adapter(saved["lora"][0], adapter_name="x")
    for fingerprint in (CFG.to_dict(), other.config.to_dict()):
        assert json.dumps(fingerprint, sort_keys=True) in str(e.value)
    assert_unchanged(pm, names, ["default"])
    with pytest.raises(ValueError, match="different base model"):
        PeftModel.from_pretrained(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)), saved["prompt"][0])
    # the same check holds for a peft-format file written by minipeft (the fingerprint is in its metadata)
    peft_dir = tmp_path / "peft"
    make(base, "lora").save_adapter(str(peft_dir), format="peft")
    with pytest.raises(ValueError, match="different base model"):
        pm.load_adapter(str(peft_dir), adapter_name="y")


def test_dropout_is_not_part_of_the_base(base, saved):
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, dropout=0.1))
    model.load_state_dict(base.state_dict())
    pm = PeftModel.from_pretrained(model, saved["pfeiffer"][0]).eval()
    with torch.no_grad():
        assert torch.equal(pm(idx_batch())[0], saved["pfeiffer"][1])


def test_first_mismatched_tensor_is_named_and_nothing_is_left(base, saved, tmp_path):
    directory = copy_adapter(saved["lora"][0], tmp_path / "bad")
    tensors = load_file(os.path.join(directory, WEIGHTS_NAME))
    bad = sorted(tensors)[1]
    tensors[bad] = torch.zeros(tensors[bad].shape[0] + 1, tensors[bad].shape[1])
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME))
    pm = get_peft_model(fresh(base), LoraConfig(r=2, target_modules=["c_fc"]))
    names = module_names(pm)
    with pytest.raises(ValueError, match=f"tensor '{bad}' has shape") as e:
        pm.load_adapter(directory, adapter_name="x")
    assert WEIGHTS_NAME in str(e.value)
    assert_unchanged(pm, names, ["default"])  # the half-added adapter was deleted again

    del tensors[bad]  # a missing tensor is named too
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME))
    with pytest.raises(ValueError, match=f"tensor '{bad}' .* is missing"):
        pm.load_adapter(directory, adapter_name="x")
    assert_unchanged(pm, names, ["default"])

    model = fresh(base)  # from_pretrained unwraps the model again when loading fails
    with pytest.raises(ValueError, match=f"'{bad}'"):
        PeftModel.from_pretrained(model, directory)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in base.named_modules()]
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_weights_raise_value_error(base, saved, tmp_path, damage):
    directory = copy_adapter(saved["prefix"][0], tmp_path / "bad")
    path = os.path.join(directory, WEIGHTS_NAME)
    data = open(path, "rb").read()
    new = {"truncated": data[: len(data) * 2 // 3], "garbage": os.urandom(len(data)), "empty": b""}[damage]
    open(path, "wb").write(new)
    pm = get_peft_model(fresh(base), LoraConfig(r=2, target_modules=["c_fc"]))
    names = module_names(pm)
    with pytest.raises(ValueError, match="not a readable safetensors file") as e:
        pm.load_adapter(directory, adapter_name="x")
    assert e.type is ValueError  # not safetensors' own error type
    assert_unchanged(pm, names, ["default"])


@pytest.mark.parametrize("text, match", [
    ('{"method": "lora", "r": ', "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"method": "dora"}', "unknown PEFT method 'dora'"),
    ('{"r": 4}', "neither a minipeft adapter config"),
    ('{"method": "lora", "r": 0}', "r must be a positive int"),
])
def test_bad_config_json_raises_value_error(base, saved, tmp_path, text, match):
    directory = copy_adapter(saved["lora"][0], tmp_path / "bad")
    (tmp_path / "bad" / CONFIG_NAME).write_text(text)
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(fresh(base), directory)


class _Tripwire:
    """Unpickling this creates a file: proof, if the file appears, that something ran the pickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_is_refused_and_never_opened(base, saved, tmp_path):
    marker = tmp_path / "unpickled"
    only_bin = tmp_path / "only_bin"
    only_bin.mkdir()
    (only_bin / CONFIG_NAME).write_text(open(os.path.join(saved["lora"][0], CONFIG_NAME)).read())
    (only_bin / "adapter_model.bin").write_bytes(pickle.dumps(_Tripwire(str(marker))))
    with pytest.raises(ValueError, match="only adapter_model.bin, a pickle"):
        PeftModel.from_pretrained(fresh(base), str(only_bin))
    both = copy_adapter(saved["lora"][0], tmp_path / "both")  # safetensors wins; the .bin is ignored
    (tmp_path / "both" / "adapter_model.bin").write_bytes(pickle.dumps(_Tripwire(str(marker))))
    PeftModel.from_pretrained(fresh(base), both)
    assert not marker.exists()


def test_missing_directory_or_files(base, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        PeftModel.from_pretrained(fresh(base), str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=f"has no {WEIGHTS_NAME}"):
        PeftModel.from_pretrained(fresh(base), str(tmp_path))


def test_name_and_format_errors(base, saved, tmp_path):
    pm = make(base, "pfeiffer")
    with pytest.raises(ValueError, match="already exists"):
        pm.load_adapter(saved["lora"][0], adapter_name="default")
    with pytest.raises(ValueError, match="adapter 'nope' does not exist"):
        pm.save_adapter(str(tmp_path), "nope")
    with pytest.raises(ValueError, match="format must be one of"):
        pm.save_adapter(str(tmp_path), format="pt")
    with pytest.raises(ValueError, match="HF peft has no format"):
        pm.save_adapter(str(tmp_path), format="peft")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------- atomic writes
def test_failed_write_leaves_the_old_files_intact(base, tmp_path, monkeypatch):
    directory = tmp_path / "a"
    make(base, "lora").save_adapter(str(directory))
    old = {name: (directory / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}

    def crash(tensors, path, metadata=None):
        open(path, "wb").write(b"half a fi")  # a partial write, then the crash
        raise OSError("disk full")

    monkeypatch.setattr("minipeft.checkpoint.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        make(base, "houlsby").save_adapter(str(directory))
    assert sorted(os.listdir(directory)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp file left
    assert {name: (directory / name).read_bytes() for name in old} == old
    PeftModel.from_pretrained(fresh(base), str(directory))  # and it still loads


# ---------------------------------------------------------------------------------------- save_pretrained
def test_save_pretrained_writes_every_adapter_as_hf_peft_lays_them_out(base, tmp_path):
    """"default" at the top, the others in <dir>/<name>/; each loads back to the same logits; no base file."""
    pm = make(base, "lora")
    torch.manual_seed(3)
    pm.add_adapter("prompt", CONFIGS["prompt"](), tokenizer=_Bytes())
    perturb(pm, "prompt")
    pm.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, "prompt"])
    assert sorted(p.name for p in (tmp_path / "prompt").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    for name, directory in (("default", tmp_path), ("prompt", tmp_path / "prompt")):
        pm.set_adapter(name)
        loaded = PeftModel.from_pretrained(fresh(base), str(directory)).eval()
        with torch.no_grad():
            assert_close(loaded(idx_batch())[0], pm(idx_batch())[0])


def test_gpt_save_pretrained_knows_a_plain_gpt_by_its_keys(base, tmp_path):
    """GPT.save_pretrained compares its state-dict keys with a plain GPT's (not substrings of names): injected
    adapters of any method and an NF4-quantized base are refused before anything is written."""
    from minipeft.quant import quantize_model

    fresh(base).save_pretrained(tmp_path / "plain")  # a plain GPT saves
    for name, model in (("bottleneck", make(base, "pfeiffer").base_model),
                        ("lora", make(base, "lora").base_model),
                        ("nf4", quantize_model(fresh(base), double_quant=False))):
        with pytest.raises(ValueError, match="not a plain GPT-2"):
            model.save_pretrained(tmp_path / name)
        assert not (tmp_path / name).exists()
