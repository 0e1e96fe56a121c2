"""The PEFT methods, all attached through one mechanism (inject.py): LoRA, bottleneck adapters, prefix
tuning, prompt tuning and P-tuning, as named adapters on one frozen GPT.

    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
"""

from minipeft.tuners.bottleneck import BottleneckAdapter, BottleneckLayer
from minipeft.tuners.config import (
    AdapterConfig,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
)
from minipeft.tuners.inject import PeftModel, find_target_modules, get_peft_model
from minipeft.tuners.lora import LoraLinear

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
    "LoraLinear",
    "BottleneckAdapter",
    "BottleneckLayer",
]

# The input methods' modules (prompt.py, prefix.py) are imported by inject.py on first use, so this package
# works before they exist; add their public names here once they do.
