"""minipeft: parameter-efficient fine-tuning from scratch, on a small GPT you can read in one sitting."""

from minipeft.model import GPT, GPTConfig, KVCache
from minipeft.tokenizer import ByteTokenizer, load_tokenizer_json
from minipeft.tuners import (
    AdapterConfig,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    get_peft_model,
)

__version__ = "0.1.0"

__all__ = [
    "GPT", "GPTConfig", "KVCache", "ByteTokenizer", "load_tokenizer_json",
    "LoraConfig", "AdapterConfig", "PrefixTuningConfig", "PromptTuningConfig", "PTuningConfig",
    "get_peft_model", "PeftModel", "__version__",
]
