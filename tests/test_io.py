"""Adapter files (minipeft/tuners/io.py): round trips for every method, strict loading, atomic writes, and a
directory written as a whole (the manifest written last; killed saves; temporary files they leave)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import pickle
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tolerances import assert_close

from minipeft import checkpoint, kernels
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
from minipeft.tuners.io import CONFIG_NAME, MANIFEST_NAME, WEIGHTS_NAME, read_adapter

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
    assert sorted(os.listdir(directory)) == [CONFIG_NAME, MANIFEST_NAME, WEIGHTS_NAME]  # no temp file left behind
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

    def crash(fd):  # the bytes went to the temporary file, and then the disk says it is full
        raise OSError("disk full")

    monkeypatch.setattr("minipeft.checkpoint.os.fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        make(base, "houlsby").save_adapter(str(directory))
    assert sorted(os.listdir(directory)) == [CONFIG_NAME, MANIFEST_NAME, WEIGHTS_NAME]  # no temp file left
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
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, MANIFEST_NAME, WEIGHTS_NAME, "prompt"])
    assert sorted(p.name for p in (tmp_path / "prompt").iterdir()) == sorted([CONFIG_NAME, MANIFEST_NAME, WEIGHTS_NAME])
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


# ---------------------------------------------------------------------------------------- a directory as a whole
# v1 and v2 differ only in lora_alpha (α/r = 2.0 and 16.0), so their tensors have the same shapes and a directory
# holding v2's tensors beside v1's config loads without any error: the silent mix the manifest exists to refuse.
LORA_V1 = dict(r=4, lora_alpha=8, target_modules=["c_attn", "mlp.c_proj"])
LORA_V2 = dict(r=4, lora_alpha=64, target_modules=["c_attn", "mlp.c_proj"])
MISMATCH = r"(does|do) not match adapter_manifest\.json"  # the manifest's refusal
ALL_FILES = sorted([CONFIG_NAME, MANIFEST_NAME, WEIGHTS_NAME])


@dataclasses.dataclass
class Saved:
    """What an adapter directory loads as: the config, the tensors and the logits on idx_batch()."""

    config: dict
    tensors: dict[str, torch.Tensor]
    logits: torch.Tensor

    def same(self, other: Saved) -> bool:
        return (self.config == other.config and self.tensors.keys() == other.tensors.keys()
                and all(torch.equal(v, other.tensors[k]) for k, v in self.tensors.items())
                and torch.equal(self.logits, other.logits))


@torch.no_grad()
def snapshot(pm: PeftModel) -> Saved:
    tensors = {k: v.detach().clone() for k, v in pm.adapter_state_dict("default").items()}
    return Saved(pm.peft_config["default"].to_dict(), tensors, pm.eval()(idx_batch())[0])


def lora(base: GPT, fields: dict, seed: int) -> PeftModel:
    torch.manual_seed(seed)
    pm = get_peft_model(fresh(base), LoraConfig(**fields))
    perturb(pm, "default")
    return pm.eval()


def loads_as(base: GPT, directory) -> Saved | ValueError:
    try:
        return snapshot(PeftModel.from_pretrained(fresh(base), str(directory)))
    except ValueError as e:
        return e


def outcome(base: GPT, directory, v1: Saved, v2: Saved) -> str:
    """"v1" or "v2" when the directory loads as exactly one of them, "refused" for the manifest's ValueError
    (which must name the directory); anything else (a mix, another error) fails the test."""
    got = loads_as(base, directory)
    if isinstance(got, ValueError):
        assert re.search(MISMATCH, str(got)) and str(directory) in str(got) and "Re-save" in str(got), str(got)
        return "refused"
    for name, saved in (("v1", v1), ("v2", v2)):
        if got.same(saved):
            return name
    pytest.fail(f"{directory} loads as neither v1 nor v2: config {got.config}")


def unchecked(directory, tmp_path) -> tuple[dict, dict[str, torch.Tensor]]:
    """What the format without a manifest loads from `directory`'s two files: (config dict, tensors)."""
    two_files = copy_adapter(str(directory), tmp_path / f"unchecked-{len(list(tmp_path.iterdir()))}")
    config, tensors, _ = read_adapter(two_files, CFG.to_dict())
    return config.to_dict(), tensors


def is_mix(directory, tmp_path, v1: Saved, v2: Saved) -> bool:
    """True when `directory` holds v1's config beside v2's tensors (what a crash between them used to leave)."""
    config, tensors = unchecked(directory, tmp_path)
    return config == v1.config and all(torch.equal(v, v2.tensors[k]) for k, v in tensors.items())


def temporaries(directory) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


@pytest.fixture(scope="module")
def v1_v2(base) -> tuple[PeftModel, Saved, PeftModel, Saved]:
    with kernels.use_backend("reference"):
        pm1, pm2 = lora(base, LORA_V1, seed=11), lora(base, LORA_V2, seed=12)
        return pm1, snapshot(pm1), pm2, snapshot(pm2)


def test_a_save_writes_the_manifest_last_with_each_files_hash(base, v1_v2, tmp_path):
    pm1, v1, _, _ = v1_v2
    order = []
    real = checkpoint.atomic_write

    def recording(path, write):
        order.append(Path(path).name)
        return real(path, write)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "atomic_write", recording)
        pm1.save_adapter(str(tmp_path))
    assert order == [WEIGHTS_NAME, CONFIG_NAME, MANIFEST_NAME]
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest == {"manifest_version": 1, "files": {
        name: {"sha256": hashlib.sha256((tmp_path / name).read_bytes()).hexdigest(),
               "size": (tmp_path / name).stat().st_size} for name in (CONFIG_NAME, WEIGHTS_NAME)}}
    assert outcome(base, tmp_path, v1, v1) == "v1"


# (a) every point where a save can fail: the writer raises halfway through a file, or os.replace raises
@pytest.mark.parametrize("how", ["write", "replace"])
@pytest.mark.parametrize("failing", [WEIGHTS_NAME, CONFIG_NAME, MANIFEST_NAME])
def test_a_failed_save_loads_as_the_old_adapter_or_is_refused_never_a_mix(base, v1_v2, tmp_path, monkeypatch,
                                                                          failing, how):
    pm1, v1, pm2, v2 = v1_v2
    directory = tmp_path / "adapter"
    pm1.save_adapter(str(directory))
    real_atomic_write, real_replace = checkpoint.atomic_write, os.replace

    def atomic_write(path, write):
        if how == "write" and Path(path).name == failing:
            def half_then_crash(tmp):
                write(tmp)
                os.truncate(tmp, os.path.getsize(tmp) // 2)
                raise OSError("disk full")
            return real_atomic_write(path, half_then_crash)
        return real_atomic_write(path, write)

    def replace(src, dst):
        if how == "replace" and Path(dst).name == failing:
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint, "atomic_write", atomic_write)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full|rename failed"):
        pm2.save_adapter(str(directory))
    monkeypatch.undo()

    assert sorted(os.listdir(directory)) == ALL_FILES  # the failed write removed its temporary file
    expected = "v1" if failing == WEIGHTS_NAME else "refused"  # once v2's tensors are in, v1 cannot load
    assert outcome(base, directory, v1, v2) == expected
    if failing == CONFIG_NAME:  # the test can fail: without the manifest this directory loads as the mix
        assert is_mix(directory, tmp_path, v1, v2)
    pm2.save_adapter(str(directory))  # a save that completes repairs the directory
    assert outcome(base, directory, v1, v2) == "v2"


# (b) a save killed by SIGKILL (no exception handler runs, temporary files stay) at each point, and at random.
# One `python -c` process imports torch once (seconds) and forks one child per point, each a save of v2 into a
# directory holding v1 that prints its pid and pauses at its point; the test kills each child with SIGKILL.
_KILLED_SAVES = r"""
import json, os, sys, time, traceback
import torch
from minipeft import checkpoint
from minipeft.model import GPT, GPTConfig
from minipeft.tuners import LoraConfig, get_peft_model
from minipeft.tuners.io import read_adapter, write_adapter

base, lora, points = map(json.loads, sys.argv[1:4])  # points: {point: [target directory, v2 reference directory]}


def say(*words):  # one write(2) per line: processes sharing a pipe cannot split each other's lines
    os.write(1, (" ".join(map(str, words)) + "\n").encode())


def pause(point):
    say("paused", point, os.getpid())
    time.sleep(600)  # until the test kills this process


def save_v2(point, target, reference):
    torch.manual_seed(0)
    pm = get_peft_model(GPT(GPTConfig(**base)), LoraConfig(**lora))
    with torch.no_grad():
        for value in pm.adapter_state_dict("default").values():
            value.add_(0.2 * torch.randn_like(value))
    pm.save_adapter(reference)  # v2 as a whole, for the test to compare with
    if point.startswith("loop"):  # save v2 and v1 (read back from the target) in turn until killed
        v1 = read_adapter(target, base)[:2]
        say("paused", point, os.getpid())
        while True:
            for config, tensors in ((pm.peft_config["default"], pm.adapter_state_dict("default")), v1):
                write_adapter(target, config, tensors)
    real_atomic_write = checkpoint.atomic_write

    def atomic_write(path, write):
        name = os.path.basename(path)

        def write_then_pause(tmp):
            write(tmp)
            if point == "written:" + name:  # the temporary file is complete, not yet renamed
                pause(point)

        written = real_atomic_write(path, write_then_pause)
        if point == "replaced:" + name:
            pause(point)
        return written

    checkpoint.atomic_write = atomic_write
    pm.save_adapter(target)


# Fork before torch computes anything (no thread pool exists yet to be copied half-way through).
children = {}
for point, (target, reference) in points.items():
    pid = os.fork()
    if pid == 0:
        try:
            save_v2(point, target, reference)
            say("finished", point)  # the point was never reached: the test reports it
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(0)
    children[pid] = point
for pid, point in children.items():
    _, status = os.waitpid(pid, 0)
    say("ended", point, os.WTERMSIG(status) if os.WIFSIGNALED(status) else "without a signal")
"""

KILL_POINTS = {  # where the save of v2 is killed → what the directory must load as
    f"written:{WEIGHTS_NAME}": "v1",
    f"replaced:{WEIGHTS_NAME}": "refused",
    f"written:{CONFIG_NAME}": "refused",
    f"replaced:{CONFIG_NAME}": "refused",
    f"written:{MANIFEST_NAME}": "refused",
    f"replaced:{MANIFEST_NAME}": "v2",
    "loop-0": None,  # a random moment in a loop of saves: v1, v2 or refused
    "loop-1": None,
    "loop-2": None,
}


def _lines(proc: subprocess.Popen) -> queue.Queue:
    """proc's stdout lines, read by a thread (a line, or None at the end), so that waiting can time out."""
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line.split())
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


@pytest.fixture(scope="module")
def killed_saves(base, v1_v2, tmp_path_factory) -> dict[str, tuple[str, str]]:
    """{point: (directory, v2's reference directory)}: v1 saved, then a save of v2 killed by SIGKILL at point."""
    root = tmp_path_factory.mktemp("killed")
    points = {point: (str(root / point.replace(":", "-")), str(root / f"{point.replace(':', '-')}-v2"))
              for point in KILL_POINTS}
    for directory, _ in points.values():
        v1_v2[0].save_adapter(directory)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    args = [json.dumps(CFG.to_dict()), json.dumps(LORA_V2), json.dumps(points)]
    with open(root / "stderr.txt", "w+") as stderr:
        # its own session: if anything goes wrong, the process and every child it forked end together
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVES, *args], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
        lines, delays, ended, unexpected = _lines(proc), random.Random(0), {}, None
        try:
            while len(ended) < len(points):
                line = lines.get(timeout=120)
                if line and line[0] == "paused" and len(line) == 3:
                    if line[1].startswith("loop"):
                        time.sleep(delays.uniform(0.0, 0.05))
                    os.kill(int(line[2]), signal.SIGKILL)
                elif line and line[0] == "ended" and len(line) >= 3:  # "ended", point, the signal that ended it
                    ended[line[1]] = " ".join(line[2:])
                else:  # the end of the output, or "finished": a point that was never reached
                    unexpected = line
                    break
        finally:
            if len(ended) < len(points):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            proc.stdout.close()
        stderr.seek(0)
        killed = {point: str(int(signal.SIGKILL)) for point in points}
        assert unexpected is None and ended == killed, (unexpected, stderr.read())
    assert proc.returncode == 0
    return points


@pytest.mark.skipif(os.name != "posix", reason="os.fork and SIGKILL are POSIX")
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_killed_save_loads_as_v1_or_v2_or_is_refused_and_the_next_save_cleans_up(
        base, v1_v2, killed_saves, tmp_path, point):
    pm1, v1, _, _ = v1_v2
    directory, reference = killed_saves[point]
    v2 = loads_as(base, reference)
    assert isinstance(v2, Saved) and v2.config["lora_alpha"] == 64 and not v2.same(v1)
    got = outcome(base, directory, v1, v2)  # fails on anything but v1, v2 or the manifest's refusal
    if KILL_POINTS[point] is not None:
        assert got == KILL_POINTS[point]
    if point.startswith(("replaced:adapter_model", "written:adapter_config")):
        assert is_mix(directory, tmp_path, v1, v2)  # the test can fail: the old format loaded exactly this
    left = temporaries(directory)
    if point.startswith("written:"):  # SIGKILL ran no clean-up: the complete temporary file is still there
        name = point.split(":", 1)[1]
        assert len(left) == 1 and left[0].startswith(f".{name}.")

    pm1.save_adapter(directory)  # the next save into the directory
    assert temporaries(directory) == [] and sorted(os.listdir(directory)) == ALL_FILES
    assert outcome(base, directory, v1, v2) == "v1"


# (c) directories without a manifest load as they always did
def test_a_directory_without_a_manifest_loads_unchecked(base, v1_v2, tmp_path):
    pm1, v1, _, v2 = v1_v2
    pm1.save_adapter(str(tmp_path))
    (tmp_path / MANIFEST_NAME).unlink()  # as an older minipeft wrote it
    assert outcome(base, tmp_path, v1, v2) == "v1"


def test_an_hf_peft_directory_loads_and_a_stale_manifest_beside_it_is_refused(base, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # everything is local (as in test_peft_interop.py)
    peft, transformers = pytest.importorskip("peft"), pytest.importorskip("transformers")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # in case it was imported before
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97,
                                                                n_positions=64)).eval()
    gpt2.save_pretrained(str(tmp_path / "gpt2"), safe_serialization=True)
    minipeft_base = GPT.from_pretrained(tmp_path / "gpt2").eval()
    model = peft.get_peft_model(gpt2, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                                      task_type="CAUSAL_LM"))
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    directory = tmp_path / "adapter"
    model.save_pretrained(str(directory))  # peft's files: no manifest
    assert MANIFEST_NAME not in os.listdir(directory)
    pm = PeftModel.from_pretrained(copy.deepcopy(minipeft_base), str(directory))
    expected = {k.removeprefix("base_model.model.").replace(".default", ""): v
                for k, v in model.state_dict().items() if "lora_" in k}
    loaded = pm.adapter_state_dict("default")
    assert loaded.keys() == expected.keys() and all(torch.equal(v, expected[k]) for k, v in loaded.items())

    # minipeft saved here first, then peft overwrote its two files: the manifest is stale, and says so
    pm.save_adapter(str(directory))
    model.save_pretrained(str(directory))
    with pytest.raises(ValueError, match=MISMATCH) as e:
        PeftModel.from_pretrained(copy.deepcopy(minipeft_base), str(directory))
    assert f"delete {MANIFEST_NAME}" in str(e.value) and "HF peft" in str(e.value)
    (directory / MANIFEST_NAME).unlink()
    PeftModel.from_pretrained(copy.deepcopy(minipeft_base), str(directory))


# (d) a file changed after the save is refused, by name
@pytest.mark.parametrize("format", ["minipeft", "peft"])
@pytest.mark.parametrize("change", ["one byte of a tensor", "one byte appended", "lora_alpha edited"])
def test_a_changed_file_is_refused_naming_it(base, v1_v2, tmp_path, format, change):
    pm1, v1, _, v2 = v1_v2
    directory = tmp_path / "adapter"
    pm1.save_adapter(str(directory), format=format)
    name = CONFIG_NAME if change == "lora_alpha edited" else WEIGHTS_NAME
    path = directory / name
    data = bytearray(path.read_bytes())
    if change == "one byte of a tensor":
        data[-1] ^= 0x01  # the last byte belongs to the last tensor's data, not to the header
    elif change == "one byte appended":
        data += b"\0"
    else:
        config = json.loads(data)
        config["lora_alpha"] = 64
        data = json.dumps(config).encode()
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=MISMATCH) as e:
        PeftModel.from_pretrained(fresh(base), str(directory))
    message = str(e.value)
    assert f"{name} does not match" in message and str(directory) in message and "Re-save" in message
    assert f"{len(data)} bytes" in message  # what is on disk, beside what the manifest records
    if change != "one byte appended":  # safetensors itself refuses that one; the other two load unchecked
        config, tensors = unchecked(directory, tmp_path)  # the test can fail: without the manifest, they load
        if change == "lora_alpha edited":
            assert config["lora_alpha"] == 64  # v1's tensors scaled as v2's, silently
        else:
            assert any(not torch.equal(v, v1.tensors[k]) for k, v in tensors.items())


@pytest.mark.parametrize("manifest, match", [
    ("{", "not valid JSON"),
    ('{"manifest_version": 2, "files": {}}', "written by a newer minipeft"),
    ('{"files": {}}', r"not an adapter manifest \(manifest_version None"),
    ('{"manifest_version": 1, "files": {"adapter_config.json": {"sha256": "00", "size": 1}}}', "must list exactly"),
    ('{"manifest_version": 1, "files": {"adapter_config.json": {"size": 1}, "adapter_model.safetensors": 3}}',
     "the entry for"),
    ('{"manifest_version": 1, "files": {"adapter_config.json": {}, "adapter_model.safetensors": {}, '
     '"../../etc/passwd": {}}}', "must list exactly"),
])
def test_a_bad_manifest_is_refused(base, v1_v2, tmp_path, manifest, match):
    v1_v2[0].save_adapter(str(tmp_path))
    (tmp_path / MANIFEST_NAME).write_text(manifest)
    with pytest.raises(ValueError, match=match) as e:
        PeftModel.from_pretrained(fresh(base), str(tmp_path))
    assert MANIFEST_NAME in str(e.value)


# ---------------------------------------------------------------------------------------- temporary files
def test_orphan_clean_up_removes_only_temporaries_of_the_names_written(tmp_path):
    orphans = [".adapter_model.safetensors.k3j9x_2a.tmp", ".adapter_config.json.abcdefgh.tmp"]
    keep = ["adapter_model.safetensors.k3j9x_2a.tmp",  # not hidden: not atomic_write's
            ".adapter_model.safetensors.k3j9x_2a.tmp.bak", ".adapter_model.safetensors.short.tmp",
            ".adapter_model.safetensors.ABCDEFGH.tmp", ".model.safetensors.k3j9x_2a.tmp", "notes.txt"]
    for name in orphans + keep:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".adapter_config.json.dir12345.tmp").mkdir()  # a directory named alike: not a file of ours
    removed = checkpoint.remove_orphan_temporaries(tmp_path, [WEIGHTS_NAME, CONFIG_NAME])
    assert sorted(p.name for p in removed) == sorted(orphans)
    assert sorted(os.listdir(tmp_path)) == sorted(keep + [".adapter_config.json.dir12345.tmp"])
    assert checkpoint.remove_orphan_temporaries(tmp_path / "missing", [WEIGHTS_NAME]) == []


def test_atomic_write_names_its_temporaries_as_the_clean_up_expects(tmp_path):
    seen = []
    written = checkpoint.atomic_write(tmp_path / "x.json", lambda tmp: (seen.append(tmp), Path(tmp).write_text("{}")))
    assert written == checkpoint.WrittenFile("x.json", hashlib.sha256(b"{}").hexdigest(), 2)
    (tmp_path / Path(seen[0]).name).write_text("an orphan")  # as if the process had been killed before the rename
    assert [p.name for p in checkpoint.remove_orphan_temporaries(tmp_path, ["x.json"])] == [Path(seen[0]).name]


def test_gpt_save_pretrained_removes_the_temporaries_of_killed_saves(base, tmp_path):
    orphans = [".model.safetensors.k3j9x_2a.tmp", ".config.json.0a1b2c3d.tmp"]
    for name in orphans + [".adapter_config.json.k3j9x_2a.tmp"]:
        (tmp_path / name).write_bytes(b"half a checkpoint")
    checkpoint.save_model(fresh(base), tmp_path)
    assert sorted(os.listdir(tmp_path)) == [".adapter_config.json.k3j9x_2a.tmp", "config.json", "model.safetensors"]


def test_atomic_write_gives_the_mode_a_new_file_gets(tmp_path, monkeypatch):
    """mkstemp makes its file private (0600); the saved file has the mode open() would give under the umask
    (read once, when minipeft.checkpoint is imported)."""
    monkeypatch.setattr(checkpoint, "_UMASK", 0o027)
    checkpoint.save_json({"a": 1}, tmp_path / "x.json")
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o640
    assert checkpoint._read_umask() == checkpoint._read_umask()  # reading it leaves it as it was


# ---------------------------------------------------------------------------------------- whole GPT-2 files
def test_untied_head_is_saved_and_loads_back_in_minipeft_and_transformers(base, tmp_path):
    """LoRA on lm_head, merged: the head no longer shares the embedding's tensor, so it is written (with
    tie_word_embeddings false) and both loaders give the merged model's logits."""
    transformers = pytest.importorskip("transformers")
    pm = get_peft_model(fresh(base), LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    idx = torch.randint(0, base.config.vocab_size, (2, 7))
    with torch.no_grad():
        adapted, _ = pm(idx)
    merged = pm.merge_and_unload()
    assert merged.lm_head.weight is not merged.transformer.wte.weight
    merged.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in load_file(str(tmp_path / "model.safetensors"))
    again = GPT.from_pretrained(tmp_path).eval()
    assert again.lm_head.weight is not again.transformer.wte.weight
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_close(again(idx)[0], adapted)
        assert_close(hf(idx).logits, adapted)
    fresh(base).save_pretrained(tmp_path / "tied")  # a tied head is still left out, as GPT-2 does
    assert json.loads((tmp_path / "tied" / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(str(tmp_path / "tied" / "model.safetensors"))


def test_from_pretrained_reads_a_sharded_index_and_no_stale_file(base, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = fresh(base)
    model.save_pretrained(tmp_path / "plain")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "plain")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB", safe_serialization=True)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    stale = {k: torch.full_like(v, 7.0) for k, v in load_file(str(tmp_path / "plain" / "model.safetensors")).items()}
    save_file(stale, str(tmp_path / "sharded" / "zz-old-shard.safetensors"))  # sorts last: it used to win
    idx = torch.randint(0, base.config.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(GPT.from_pretrained(tmp_path / "sharded").eval()(idx)[0], model.eval()(idx)[0])
    (tmp_path / "sharded" / shards[0]).unlink()
    with pytest.raises(ValueError, match=f"lists files that are not in.*{shards[0]}"):
        GPT.from_pretrained(tmp_path / "sharded")


def test_save_whole_model_keeps_the_base_special_token_ids(base, tmp_path):
    from minipeft.finetune_jsonl import save_whole_model

    base_dir = tmp_path / "base"
    fresh(base).save_pretrained(base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    checkpoint.save_json({**config, "bos_token_id": 3, "eos_token_id": 4, "pad_token_id": 5}, base_dir / "config.json")
    checkpoint.save_json({"eos_token_id": 4}, base_dir / "generation_config.json")
    (base_dir / "tokenizer.json").write_text("{}")
    save_whole_model(fresh(base), base_dir, tmp_path / "out")
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (out["bos_token_id"], out["eos_token_id"], out["pad_token_id"]) == (3, 4, 5)
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == {"eos_token_id": 4}
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
