"""HF peft interop on GPT-2 (minipeft/tuners/io.py): peft's files load into minipeft, minipeft's
format="peft" files load into peft, and both give the same logits to 1e-4 in fp32.

Everything is local: a small random transformers GPT-2 is built and saved inside the test, and the Hub is
switched off, so nothing is downloaded.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tolerances import assert_close

from minipeft import kernels
from minipeft.model import GPT
from minipeft.tuners import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, PTuningConfig
from minipeft.tuners import get_peft_model as minipeft_get_peft_model

T = 7


@pytest.fixture(scope="module")
def hf():
    """(peft, transformers, the saved GPT-2 directory), with the Hub offline for the whole module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        peft = pytest.importorskip("peft")
        transformers = pytest.importorskip("transformers")
        import huggingface_hub.constants

        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # in case it was imported before
        yield peft, transformers


@pytest.fixture(scope="module")
def gpt2_dir(hf, tmp_path_factory) -> str:
    _, transformers = hf
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64)
    directory = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(str(directory), safe_serialization=True)
    return str(directory)


@pytest.fixture(scope="module")
def minipeft_base(gpt2_dir) -> GPT:
    return GPT.from_pretrained(gpt2_dir).eval()


@pytest.fixture(autouse=True)
def reference_kernels():
    with kernels.use_backend("reference"):
        yield


def hf_base(hf, gpt2_dir):
    return hf[1].GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()


def idx_batch() -> torch.Tensor:
    return torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def peft_logits(model) -> torch.Tensor:
    logits = model(input_ids=idx_batch()).logits
    return logits[:, -T:]  # prompt tuning returns the virtual tokens' logits too: keep the real tokens'


@torch.no_grad()
def minipeft_logits(pm) -> torch.Tensor:
    return pm(idx_batch())[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


PEFT_CONFIGS = {
    "lora": lambda p: p.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM"),
    "lora_rslora": lambda p: p.LoraConfig(r=4, lora_alpha=3, target_modules=["c_attn", "c_fc"], use_rslora=True,
                                          task_type="CAUSAL_LM"),
    "prompt": lambda p: p.PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="RANDOM", task_type="CAUSAL_LM"),
    "prefix": lambda p: p.PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"),
    # peft stores the projection's and the P-tuning encoder's *output*, so these load as plain prefix / prompt
    "prefix_projection": lambda p: p.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True,
                                                        encoder_hidden_size=16, task_type="CAUSAL_LM"),
    "p_tuning": lambda p: p.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16, task_type="CAUSAL_LM"),
}


@pytest.mark.parametrize("method", list(PEFT_CONFIGS))
def test_peft_file_loads_into_minipeft(hf, gpt2_dir, minipeft_base, tmp_path, method):
    peft = hf[0]
    torch.manual_seed(3)
    model = peft.get_peft_model(hf_base(hf, gpt2_dir), PEFT_CONFIGS[method](peft))
    with torch.no_grad():  # LoRA's B starts at zero: perturb every adapter tensor so the test can fail
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    model.eval()
    expected = peft_logits(model)
    assert max_diff(expected, peft_logits(hf_base(hf, gpt2_dir))) > 1e-2  # the adapter does something
    model.save_pretrained(str(tmp_path))

    pm = PeftModel.from_pretrained(copy.deepcopy(minipeft_base), str(tmp_path)).eval()
    assert_close(minipeft_logits(pm), expected, "interop")

    # and back: minipeft writes peft's format, peft reads it to the same logits
    pm.save_adapter(str(tmp_path / "back"), format="peft", base_model_name_or_path=gpt2_dir)
    again = peft.PeftModel.from_pretrained(hf_base(hf, gpt2_dir), str(tmp_path / "back")).eval()
    assert_close(peft_logits(again), expected, "interop")


MINIPEFT_CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]),
    "lora_regex_with_lm_head": lambda: LoraConfig(r=2, lora_alpha=2, target_modules=r".*(c_fc|lm_head)"),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=5),
    "ptuning": lambda: PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=8,
                                     encoder_reparameterization_type="LSTM"),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=5),
    "prefix_projection": lambda: PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True),
}


@pytest.mark.parametrize("method", list(MINIPEFT_CONFIGS))
def test_minipeft_peft_format_loads_into_peft(hf, gpt2_dir, minipeft_base, tmp_path, method):
    peft = hf[0]
    torch.manual_seed(4)
    pm = minipeft_get_peft_model(copy.deepcopy(minipeft_base), MINIPEFT_CONFIGS[method]())
    with torch.no_grad():
        for value in pm.adapter_state_dict("default").values():
            value.add_(0.3 * torch.randn_like(value))
    pm.eval()
    expected = minipeft_logits(pm)
    pm.save_adapter(str(tmp_path), format="peft", base_model_name_or_path=gpt2_dir)

    model = peft.PeftModel.from_pretrained(hf_base(hf, gpt2_dir), str(tmp_path)).eval()
    assert_close(peft_logits(model), expected, "interop")
    assert max_diff(expected, minipeft_logits_base(minipeft_base)) > 1e-2

    # minipeft reads its own peft-format file back (and checks the base fingerprint kept in its metadata)
    back = PeftModel.from_pretrained(copy.deepcopy(minipeft_base), str(tmp_path)).eval()
    assert_close(minipeft_logits(back), expected, "interop")


@torch.no_grad()
def minipeft_logits_base(model: GPT) -> torch.Tensor:
    return model(idx_batch())[0]


def test_peft_file_for_a_different_base_or_with_unsupported_options(hf, gpt2_dir, minipeft_base, tmp_path):
    peft, transformers = hf
    other_dir = tmp_path / "wide"
    config = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=97, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(other_dir), safe_serialization=True)
    wide = transformers.GPT2LMHeadModel.from_pretrained(str(other_dir))
    peft.get_peft_model(wide, peft.PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")).save_pretrained(
        str(tmp_path / "prefix"))
    with pytest.raises(ValueError, match="token_dim is 48 but the model's n_embd is 32"):
        PeftModel.from_pretrained(copy.deepcopy(minipeft_base), str(tmp_path / "prefix"))

    wide = transformers.GPT2LMHeadModel.from_pretrained(str(other_dir))
    peft.get_peft_model(wide, peft.LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM")).save_pretrained(
        str(tmp_path / "lora"))
    with pytest.raises(ValueError, match=r"tensor 'transformer\.h\.0\.attn\.c_attn\.lora_A\.weight' has shape"):
        PeftModel.from_pretrained(copy.deepcopy(minipeft_base), str(tmp_path / "lora"))

    dora = peft.LoraConfig(r=2, target_modules=["c_attn"], use_dora=True, task_type="CAUSAL_LM")
    peft.get_peft_model(hf_base(hf, gpt2_dir), dora).save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(ValueError, match="use_dora"):
        PeftModel.from_pretrained(copy.deepcopy(minipeft_base), str(tmp_path / "dora"))

    config_path = tmp_path / "dora" / "adapter_config.json"  # a PiSSA file needs PiSSA's changed base weights
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_dora": False,
                                       "init_lora_weights": "pissa"}))
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        PeftModel.from_pretrained(copy.deepcopy(minipeft_base), str(tmp_path / "dora"))
