"""The PEFT methods, all attached through one mechanism (inject.py): LoRA, bottleneck adapters, prefix
tuning, prompt tuning and P-tuning, as named adapters on one frozen GPT; composition blocks (Stack, Average,
Fuse, Parallel) and AdapterFusion combine them.

    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
"""

from minipeft.targets import find_target_modules
from minipeft.tuners.bottleneck import BottleneckAdapter, BottleneckLayer
from minipeft.tuners.composition import AdapterCompositionBlock, Average, Fuse, Parallel, Stack
from minipeft.tuners.config import (
    AdapterConfig,
    AdapterFusionConfig,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
)
from minipeft.tuners.fusion import AdapterFusion
from minipeft.tuners.inject import PeftModel, get_peft_model
from minipeft.tuners.input_adapter import InputAdapter
from minipeft.tuners.io import read_adapter, write_adapter
from minipeft.tuners.layer import AdapterLayer
from minipeft.tuners.lora import LoraLinear, combine_lora
from minipeft.tuners.prefix import PrefixEncoder
from minipeft.tuners.prompt import PromptEmbedding, PTuningEmbedding, nearest_tokens

__all__ = [
    "PeftConfig",
    "LoraConfig",
    "AdapterConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "PTuningConfig",
    "get_peft_model",
    "PeftModel",
    "find_target_modules",
    "AdapterLayer",
    "InputAdapter",
    "LoraLinear",
    "combine_lora",
    "BottleneckAdapter",
    "BottleneckLayer",
    "AdapterCompositionBlock",
    "Stack",
    "Parallel",
    "Average",
    "Fuse",
    "AdapterFusion",
    "AdapterFusionConfig",
    "PrefixEncoder",
    "PromptEmbedding",
    "PTuningEmbedding",
    "nearest_tokens",
    "read_adapter",
    "write_adapter",
]
