"""The configuration of every PEFT method: small dataclasses of JSON-able values, validated on creation.

A config says *what* to add to a frozen base model; `get_peft_model` (inject.py) does the adding. Each
config knows its method name, serialises to the `adapter_config.json` stored beside an adapter's weights,
and is rebuilt from it with `PeftConfig.from_dict`. Names and defaults follow HF peft where it has the
same method, so a peft user reads them without a dictionary. Objects that cannot be stored (a tokenizer)
are used when the adapter is created and never saved.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar


@dataclass
class PeftConfig:
    """Fields common to every method. `base_model` is filled in at injection: a fingerprint of the base
    (its GPTConfig as a dict) that adapter files are checked against when they are loaded."""

    method: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # "layer": wraps or adds modules inside the model; "input": acts on its input

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # overridden by each method
        pass

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("save", True)}
        return {"method": self.method, **json.loads(json.dumps(d))}  # a deep, JSON-clean copy

    @staticmethod
    def from_dict(d: dict[str, Any]) -> PeftConfig:
        d = dict(d)
        method = d.pop("method", None)
        if method not in CONFIGS:
            raise ValueError(f"unknown PEFT method {method!r} in config; known: {', '.join(CONFIGS)}")
        cls = CONFIGS[method]
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{cls.__name__} got unknown fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def _check_positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


@dataclass
class LoraConfig(PeftConfig):
    """LoRA: W₀x + (α/r)·B·A·x on each targeted Linear (α/√r with rsLoRA)."""

    method: ClassVar[str] = "lora"
    kind: ClassVar[str] = "layer"
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["c_attn"])
    use_rslora: bool = False
    # True: Kaiming-uniform A, zero B; "gaussian": A ~ N(0, 1/r), zero B; False: random B too (not identity)
    init_lora_weights: bool | str = True
    bias: str = "none"
    base_model: dict | None = None

    def validate(self) -> None:
        _check_positive_int("LoraConfig", "r", self.r)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"LoraConfig.init_lora_weights must be True, False or 'gaussian', got "
                             f"{self.init_lora_weights!r}")
        if self.bias != "none":
            raise ValueError(f"LoraConfig.bias: only 'none' is supported (biases stay frozen), got {self.bias!r}")
        if not self.target_modules:
            raise ValueError("LoraConfig.target_modules must name at least one module (or 'all-linear')")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r ** 0.5 if self.use_rslora else self.r)


ADAPTER_ARCHITECTURES = ("pfeiffer", "houlsby")
NON_LINEARITIES = ("relu", "gelu", "gelu_new", "swish", "tanh")


@dataclass
class AdapterConfig(PeftConfig):
    """A bottleneck adapter: h + up(f(down(h))). Pfeiffer: after each block's FFN; Houlsby: after attention
    and after the FFN."""

    method: ClassVar[str] = "bottleneck"
    kind: ClassVar[str] = "layer"
    architecture: str = "pfeiffer"
    reduction_factor: int = 16
    non_linearity: str = "relu"
    base_model: dict | None = None

    def validate(self) -> None:
        if self.architecture not in ADAPTER_ARCHITECTURES:
            raise ValueError(f"AdapterConfig.architecture must be one of {ADAPTER_ARCHITECTURES}, got "
                             f"{self.architecture!r}")
        _check_positive_int("AdapterConfig", "reduction_factor", self.reduction_factor)
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(f"AdapterConfig.non_linearity must be one of {NON_LINEARITIES}, got "
                             f"{self.non_linearity!r}")

    @classmethod
    def load(cls, name: str, **overrides: Any) -> AdapterConfig:
        """The `adapters` library's spelling: AdapterConfig.load("pfeiffer", reduction_factor=16)."""
        if name not in ADAPTER_ARCHITECTURES:
            raise ValueError(f"unknown adapter architecture {name!r}; available: {', '.join(ADAPTER_ARCHITECTURES)}")
        return cls(architecture=name, **overrides)


@dataclass
class PrefixTuningConfig(PeftConfig):
    """Prefix tuning: n learned key/value pairs in front of every layer's attention."""

    method: ClassVar[str] = "prefix"
    kind: ClassVar[str] = "input"
    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None  # the MLP's width with prefix_projection (default: n_embd)
    base_model: dict | None = None

    def validate(self) -> None:
        _check_positive_int("PrefixTuningConfig", "num_virtual_tokens", self.num_virtual_tokens)
        if self.encoder_hidden_size is not None:
            _check_positive_int("PrefixTuningConfig", "encoder_hidden_size", self.encoder_hidden_size)


PROMPT_INITS = ("TEXT", "RANDOM", "SAMPLE_VOCAB")


@dataclass
class PromptTuningConfig(PeftConfig):
    """Prompt tuning: n learned input embeddings prepended to the token embeddings."""

    method: ClassVar[str] = "prompt"
    kind: ClassVar[str] = "input"
    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer: Any = field(default=None, repr=False, metadata={"save": False})  # used at init, never saved
    base_model: dict | None = None

    def validate(self) -> None:
        _check_positive_int("PromptTuningConfig", "num_virtual_tokens", self.num_virtual_tokens)
        if self.prompt_tuning_init not in PROMPT_INITS:
            raise ValueError(f"PromptTuningConfig.prompt_tuning_init must be one of {PROMPT_INITS}, got "
                             f"{self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ValueError("PromptTuningConfig.prompt_tuning_init_text is required when prompt_tuning_init='TEXT'")

ENCODER_TYPES = ("MLP", "LSTM")


@dataclass
class PTuningConfig(PeftConfig):
    """P-tuning: a prompt encoder (MLP or LSTM) turns n learned seeds into the virtual-token embeddings."""

    method: ClassVar[str] = "ptuning"
    kind: ClassVar[str] = "input"
    num_virtual_tokens: int = 20
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int = 128
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    base_model: dict | None = None

    def validate(self) -> None:
        _check_positive_int("PTuningConfig", "num_virtual_tokens", self.num_virtual_tokens)
        _check_positive_int("PTuningConfig", "encoder_hidden_size", self.encoder_hidden_size)
        _check_positive_int("PTuningConfig", "encoder_num_layers", self.encoder_num_layers)
        if self.encoder_reparameterization_type not in ENCODER_TYPES:
            raise ValueError(f"PTuningConfig.encoder_reparameterization_type must be one of {ENCODER_TYPES}, "
                             f"got {self.encoder_reparameterization_type!r}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"PTuningConfig.encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")


CONFIGS: dict[str, type[PeftConfig]] = {
    c.method: c for c in (LoraConfig, AdapterConfig, PrefixTuningConfig, PromptTuningConfig, PTuningConfig)
}
