"""The fine-tuning methods the course texts compare, each as a builder and a learning rate: the registry `METHODS`.

A method is a function `build(base, task, tokenizer) -> model to train` (the base is consumed: wrapped in
place or quantized) and the rate it trains best at. Its configuration is `method_config(key, options)`: the
defaults below, which `minipeft finetune --base` lets a user change (`MethodOptions`: --r, --alpha, …).
`minipeft compare`, `minipeft finetune`, the learning-rate sweep and chapter 9 all take their methods from
here, so "LoRA" means the same model everywhere.

Learning rates. Each method gets the rate that scored best for it in a sweep of three rates around its
family's usual range, on the validation split of the default task (`facts`) with the default base and
budget (150 steps of 16): benchmarks/lr_sweep.py, results in benchmarks/RESULTS.md. That is the fair
treatment the papers give their own methods: full fine-tuning wants a small rate, low-rank and bottleneck
adapters a larger one, and soft prompts the largest ("higher rates often work better", the prompt- and
prefix-tuning guide; Lester et al. used 0.3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from minipeft.data import Task
from minipeft.model import GPT
from minipeft.quant import quantize_model
from minipeft.tokenizer import ByteTokenizer
from minipeft.tuners import (
    AdapterConfig,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    get_peft_model,
)


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    lr: float
    build: Callable[[GPT, Task, ByteTokenizer], torch.nn.Module]  # the model to train (the base is consumed)


@dataclass(frozen=True)
class MethodOptions:
    """The knobs of a method that `minipeft finetune --base` exposes; None keeps the default that METHODS uses.

    r, alpha, target_modules: LoRA and QLoRA. reduction_factor: the bottleneck adapters. num_virtual_tokens:
    prefix, prompt and P-tuning. init_text: prompt tuning, initialised from that text's token embeddings (TEXT
    init) instead of at random.
    """

    r: int | None = None
    alpha: float | None = None
    target_modules: str | list[str] | None = None
    num_virtual_tokens: int | None = None
    init_text: str | None = None
    reduction_factor: int | None = None


OPTIONS_OF: dict[str, tuple[str, ...]] = {  # which MethodOptions fields each method takes
    "full": (), "lora": ("r", "alpha", "target_modules"), "qlora": ("r", "alpha", "target_modules"),
    "lora8": ("r", "alpha", "target_modules"),
    "pfeiffer": ("reduction_factor",), "houlsby": ("reduction_factor",), "prefix": ("num_virtual_tokens",),
    "prompt": ("num_virtual_tokens", "init_text"), "ptuning": ("num_virtual_tokens",),
}


LORA_METHODS = ("lora", "qlora", "lora8")  # LoRA on a 16-, 4- and 8-bit base


def _or(value, default):
    return default if value is None else value


def method_config(key: str, options: MethodOptions | None = None, tokenizer=None) -> PeftConfig | None:
    """The PeftConfig of method `key` with `options` over its defaults; None for full fine-tuning.

    Raises:
        ValueError: an unknown method, or an option the method does not take (named, with the ones it does).
    """
    if key not in OPTIONS_OF:
        raise ValueError(f"unknown method {key!r}; available: {', '.join(OPTIONS_OF)}")
    if options is None:
        options = MethodOptions()
    if not isinstance(options, MethodOptions):
        raise TypeError(f"options must be a MethodOptions or None, got {type(options).__name__}")
    given = [f for f in fields(options) if getattr(options, f.name) is not None]
    wrong = [f.name for f in given if f.name not in OPTIONS_OF[key]]
    if wrong:
        takes = ", ".join(OPTIONS_OF[key]) or "none"
        raise ValueError(f"option {wrong[0]}={getattr(options, wrong[0])!r} does not apply to method {key!r} "
                         f"(its options: {takes})")
    o = options
    if key in LORA_METHODS:
        return LoraConfig(r=_or(o.r, 8), lora_alpha=_or(o.alpha, 16),
                          target_modules=_or(o.target_modules, "all-linear"))
    if key in ("pfeiffer", "houlsby"):
        return AdapterConfig.load(key, reduction_factor=_or(o.reduction_factor, 16))
    if key == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=_or(o.num_virtual_tokens, 10))
    if key == "prompt":
        text = bool(o.init_text)
        return PromptTuningConfig(num_virtual_tokens=_or(o.num_virtual_tokens, 20),
                                  prompt_tuning_init="TEXT" if text else "RANDOM",
                                  prompt_tuning_init_text=o.init_text if text else None,
                                  tokenizer=tokenizer if text else None)
    if key == "ptuning":
        return PTuningConfig(num_virtual_tokens=_or(o.num_virtual_tokens, 20), encoder_hidden_size=128)
    return None  # full fine-tuning


def apply_method(key: str, base: GPT, options: MethodOptions | None = None, tokenizer=None) -> torch.nn.Module:
    """The model to train for method `key` on `base` (consumed: wrapped in place, or quantized first for QLoRA
    and the 8-bit LoRA)."""
    config = method_config(key, options, tokenizer)
    if config is None:
        return base.requires_grad_(True)
    if key == "qlora":
        base = quantize_model(base, target_modules="all-linear", blocksize=64, double_quant=True)
    if key == "lora8":
        base = quantize_model(base, target_modules="all-linear", bits=8)  # LLM.int8(), threshold 6
    return get_peft_model(base, config, tokenizer=tokenizer if isinstance(config, PromptTuningConfig) else None)


def _builder(key: str):
    def build(base, task, tok):
        return apply_method(key, base, MethodOptions(), tok)

    return build


def _prompt(base, task, tok):  # TEXT init from the task's hand-written prompt
    return apply_method("prompt", base, MethodOptions(init_text=task.discrete_prompt or None), tok)


METHODS: dict[str, Method] = {m.key: m for m in [
    Method("full", "full fine-tuning", 3e-4, _builder("full")),
    Method("lora", "LoRA r=8, all linear layers", 1e-3, _builder("lora")),
    Method("qlora", "QLoRA: NF4+DQ base, LoRA r=8 all linear", 1e-3, _builder("qlora")),
    # LoRA's swept rate, not swept again: the 8-bit base changes the frozen weights' rounding, not the adapter
    Method("lora8", "LoRA r=8 all linear on an LLM.int8() 8-bit base", 1e-3, _builder("lora8")),
    Method("pfeiffer", "Pfeiffer adapter rf=16", 3e-3, _builder("pfeiffer")),
    Method("houlsby", "Houlsby adapters rf=16", 3e-3, _builder("houlsby")),
    Method("prefix", "prefix tuning, 10 tokens", 3e-2, _builder("prefix")),
    Method("prompt", "prompt tuning, 20 tokens (TEXT init)", 1e-1, _prompt),
    Method("ptuning", "P-tuning, 20 tokens (MLP encoder)", 1e-2, _builder("ptuning")),
]}
