"""The fine-tuning methods the seeds compare, each as a builder and a learning rate: the registry `METHODS`.

A method is a function `build(base, task, tokenizer) -> model to train` (the base is consumed: wrapped in
place or quantized) and the rate it trains best at. `minipeft compare`, `minipeft finetune`, the learning-rate
sweep and chapter 9 all take their methods from here, so "LoRA" means the same model everywhere.

Learning rates. Each method gets the rate that scored best for it in a sweep of three rates around its
family's usual range, on the validation split of the default task (`facts`) with the default base and
budget (150 steps of 16): benchmarks/lr_sweep.py, results in benchmarks/RESULTS.md. That is the fair
treatment the papers give their own methods: full fine-tuning wants a small rate, low-rank and bottleneck
adapters a larger one, and soft prompts the largest ("higher learning rates often work better", seed 004;
Lester et al. used 0.3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from minipeft.data import Task
from minipeft.model import GPT
from minipeft.quant import quantize_model
from minipeft.tokenizer import ByteTokenizer
from minipeft.tuners import (
    AdapterConfig,
    LoraConfig,
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


def _full(base, task, tok):
    return base.requires_grad_(True)


def _lora(base, task, tok):
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


def _qlora(base, task, tok):
    return _lora(quantize_model(base, target_modules="all-linear", blocksize=64, double_quant=True), task, tok)


def _bottleneck(architecture: str):
    def build(base, task, tok):
        return get_peft_model(base, AdapterConfig.load(architecture, reduction_factor=16))

    return build


def _prefix(base, task, tok):
    return get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=10))


def _prompt(base, task, tok):
    cfg = PromptTuningConfig(num_virtual_tokens=20, prompt_tuning_init="TEXT",
                             prompt_tuning_init_text=task.discrete_prompt, tokenizer=tok)
    return get_peft_model(base, cfg, tokenizer=tok)


def _ptuning(base, task, tok):
    return get_peft_model(base, PTuningConfig(num_virtual_tokens=20, encoder_hidden_size=128))


METHODS: dict[str, Method] = {m.key: m for m in [
    Method("full", "full fine-tuning", 3e-4, _full),
    Method("lora", "LoRA r=8, all linear layers", 1e-3, _lora),
    Method("qlora", "QLoRA: NF4+DQ base, LoRA r=8 all linear", 1e-3, _qlora),
    Method("pfeiffer", "Pfeiffer adapter rf=16", 3e-3, _bottleneck("pfeiffer")),
    Method("houlsby", "Houlsby adapters rf=16", 3e-3, _bottleneck("houlsby")),
    Method("prefix", "prefix tuning, 10 tokens", 3e-2, _prefix),
    Method("prompt", "prompt tuning, 20 tokens (TEXT init)", 1e-1, _prompt),
    Method("ptuning", "P-tuning, 20 tokens (MLP encoder)", 1e-2, _ptuning),
]}
