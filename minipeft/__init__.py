"""minipeft: parameter-efficient fine-tuning from scratch, on a small GPT you can read in one sitting."""

from minipeft.model import GPT, GPTConfig, KVCache
from minipeft.tokenizer import ByteTokenizer, load_tokenizer_json
from minipeft.tuners import (
    AdapterConfig,
    Average,
    Fuse,
    LoraConfig,
    Parallel,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    Stack,
    get_peft_model,
)

__version__ = "0.1.0"

__all__ = [
    "GPT", "GPTConfig", "KVCache", "ByteTokenizer", "load_tokenizer_json",
    "LoraConfig", "AdapterConfig", "PrefixTuningConfig", "PromptTuningConfig", "PTuningConfig",
    "get_peft_model", "PeftModel", "Stack", "Parallel", "Average", "Fuse", "__version__",
]
