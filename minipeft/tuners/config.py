"""The configuration of every PEFT method (and of AdapterFusion): small dataclasses of JSON-able values,
validated on creation.

A config says *what* to add to a frozen base model; `get_peft_model` (inject.py) does the adding. Each
config knows its method name, serialises to the `adapter_config.json` stored beside an adapter's weights,
and is rebuilt from it with `PeftConfig.from_dict`. Names and defaults follow HF peft where it has the
same method, so a peft user reads them without a dictionary. Objects that cannot be stored (a tokenizer)
are used when the adapter is created and never saved.

A config checks every field when it is created (`__post_init__` → `validate`), so the modules built from it
trust it and check nothing again: this file is the one home of each rule. A value of the wrong type raises
TypeError (`r=2.0`, `lora_alpha="16"`, `use_rslora="no"`; a bool is not an int), a value of the right type
that is not allowed raises ValueError (`r=0`, `lora_dropout=1.0`, a NaN or an infinity). Each message names
the field as `Class.field`, what it got and what it expects. One private helper per kind of check
(`_check_positive_int`, `_check_real`, `_check_probability`, ...) writes each rule once. A few values are
normalised as they are checked: a tuple of target modules is stored as a list, numpy scalars as Python ones,
so that `to_dict()` is plain JSON and `PeftConfig.from_dict(c.to_dict()) == c`.
"""

from __future__ import annotations

import json
import numbers
import re
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from minipeft.checks import is_finite, shown
from minipeft.tuners.bottleneck import ACTIVATIONS
from minipeft.tuners.fusion import FUSION_TYPES


@dataclass
class PeftConfig:
    """Fields common to every method. `base_model` is filled in at injection: a fingerprint of the base
    (its GPTConfig as a dict) that adapter files are checked against when they are loaded."""

    method: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # "layer": wraps or adds modules inside the model; "input": acts on its input

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # overridden by each method: check every field, normalise a few (see above)
        pass

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("save", True)}
        return {"method": self.method, **json.loads(json.dumps(d))}  # a deep, JSON-clean copy

    @staticmethod
    def from_dict(d: dict[str, Any]) -> PeftConfig:
        if not isinstance(d, dict):
            raise TypeError(f"PeftConfig.from_dict expects a dict (a parsed adapter_config.json), {_got(d)}")
        d = dict(d)
        method = d.pop("method", None)
        if not isinstance(method, str) or method not in CONFIGS:
            raise ValueError(f"unknown PEFT method {method!r} in config; known: {', '.join(CONFIGS)}")
        cls = CONFIGS[method]
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{cls.__name__} got unknown fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


# ------------------------------------------------------------------------------------------------ checks
# Each helper reads `config.<name>`, raises TypeError / ValueError naming `Class.name`, and returns the value
# to store (the same value, or its plain-Python form).


def _field(config: PeftConfig, name: str) -> tuple[str, Any]:
    return f"{type(config).__name__}.{name}", getattr(config, name)


def _got(value: Any) -> str:
    return f"got {shown(value)} ({type(value).__name__})"


def _check_positive_int(config: PeftConfig, name: str) -> int:
    where, value = _field(config, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # True is an int to Python, not here
        raise TypeError(f"{where} must be a positive int, {_got(value)}")
    if value <= 0:
        raise ValueError(f"{where} must be a positive int, got {shown(value)}")
    return int(value)


def _check_optional_positive_int(config: PeftConfig, name: str) -> int | None:
    return None if getattr(config, name) is None else _check_positive_int(config, name)


def _check_real(config: PeftConfig, name: str, *, nonzero: bool = False) -> int | float:
    """A finite int or float (ints stay ints, so 16 is saved as 16); with `nonzero`, 0 is refused too."""
    where, value = _field(config, name)
    expected = "a finite, non-zero real number (int or float)" if nonzero else "a finite real number (int or float)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be {expected}, {_got(value)}")
    if not is_finite(value) or (nonzero and value == 0):
        raise ValueError(f"{where} must be {expected}, got {shown(value)}")
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _check_probability(config: PeftConfig, name: str) -> int | float:
    """A dropout probability: finite, in [0, 1) (p = 1 would drop everything)."""
    value = _check_real(config, name)
    if not 0 <= value < 1:
        raise ValueError(f"{type(config).__name__}.{name} must be in [0, 1), got {value!r}")
    return value


def _check_bool(config: PeftConfig, name: str) -> bool:
    where, value = _field(config, name)
    if not isinstance(value, bool):  # "no", 0 and 1 are refused: the intent of a string or an int is unclear
        raise TypeError(f"{where} must be True or False, {_got(value)}")
    return value


def _check_choice(config: PeftConfig, name: str, choices: tuple[Any, ...]) -> Any:
    """One of `choices`: a value of none of their types is a TypeError, another value of their type a ValueError."""
    where, value = _field(config, name)
    if not isinstance(value, tuple({type(c) for c in choices})):
        raise TypeError(f"{where} must be one of {choices}, {_got(value)}")
    if value not in choices:
        raise ValueError(f"{where} must be one of {choices}, got {value!r}")
    return value


def _check_optional_text(config: PeftConfig, name: str) -> str | None:
    where, value = _field(config, name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{where} must be None or a non-empty str, {_got(value)}")
    if not value:
        raise ValueError(f"{where} must be None or a non-empty str, got ''")
    return value


def _check_target_modules(config: PeftConfig, name: str) -> str | list[str]:
    """"all-linear", a regex (checked here by compiling it) or a non-empty list/tuple of names (stored as a list)."""
    where, value = _field(config, name)
    expected = "'all-linear', a non-empty regex string or a non-empty list of module names"
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{where} must be {expected}, got ''")
        if value != "all-linear":
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"{where} {value!r} is not a valid regular expression: {e}") from e
        return value
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{where} must be {expected}, {_got(value)}")
    if not value:
        raise ValueError(f"{where} must name at least one module (or be 'all-linear'), got {value!r}")
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"{where} must hold module names (str), got {item!r} ({type(item).__name__}) in {value!r}")
        if not item:
            raise ValueError(f"{where} must hold non-empty module names, got '' in {value!r}")
    return list(value)


def _check_base_model(config: PeftConfig, name: str = "base_model") -> dict[str, Any] | None:
    """None (not yet injected) or the base's fingerprint: a dict of JSON values, as GPTConfig.to_dict() gives."""
    where, value = _field(config, name)
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise TypeError(f"{where} must be None or a dict with str keys (a GPTConfig.to_dict()), {_got(value)}")
    try:
        json.dumps(value, allow_nan=False)
    except TypeError as e:
        raise TypeError(f"{where} must hold JSON values only, got {value!r}: {e}") from e
    except ValueError as e:
        raise ValueError(f"{where} must hold finite numbers only, got {value!r}") from e
    return value


# ------------------------------------------------------------------------------------------------ configs


@dataclass
class LoraConfig(PeftConfig):
    """LoRA: W₀x + (α/r)·B·A·x on each targeted Linear (α/√r with rsLoRA).

    `lora_alpha` may be any finite real number except 0, as in peft: a negative α only flips the sign of B·A
    (which training can undo), while α = 0 multiplies the update by zero and, since B's gradient is scaled
    by α too, nothing would ever train. `target_modules`: matched by minipeft.targets.find_target_modules.
    """

    method: ClassVar[str] = "lora"
    kind: ClassVar[str] = "layer"
    r: int = 8
    lora_alpha: float = 8  # an int is fine and is stored as given
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["c_attn"])
    use_rslora: bool = False
    # True: Kaiming-uniform A, zero B; "gaussian": A ~ N(0, 1/r), zero B; False: random B too (not identity)
    init_lora_weights: bool | str = True
    bias: str = "none"  # the only choice: biases stay frozen
    base_model: dict | None = None

    def validate(self) -> None:
        self.r = _check_positive_int(self, "r")
        self.lora_alpha = _check_real(self, "lora_alpha", nonzero=True)
        self.lora_dropout = _check_probability(self, "lora_dropout")
        self.target_modules = _check_target_modules(self, "target_modules")
        self.use_rslora = _check_bool(self, "use_rslora")
        self.init_lora_weights = _check_choice(self, "init_lora_weights", (True, False, "gaussian"))
        self.bias = _check_choice(self, "bias", ("none",))
        self.base_model = _check_base_model(self)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r ** 0.5 if self.use_rslora else self.r)


ADAPTER_ARCHITECTURES = ("pfeiffer", "houlsby")


@dataclass
class AdapterConfig(PeftConfig):
    """A bottleneck adapter: h + up(f(down(h))). Pfeiffer: after each block's FFN; Houlsby: after attention
    and after the FFN. `non_linearity` is a key of bottleneck.ACTIVATIONS, the one list of them."""

    method: ClassVar[str] = "bottleneck"
    kind: ClassVar[str] = "layer"
    architecture: str = "pfeiffer"
    reduction_factor: int = 16
    non_linearity: str = "relu"
    base_model: dict | None = None

    def validate(self) -> None:
        self.architecture = _check_choice(self, "architecture", ADAPTER_ARCHITECTURES)
        self.reduction_factor = _check_positive_int(self, "reduction_factor")
        self.non_linearity = _check_choice(self, "non_linearity", tuple(ACTIVATIONS))
        self.base_model = _check_base_model(self)

    @classmethod
    def load(cls, name: str, **overrides: Any) -> AdapterConfig:
        """The `adapters` library's spelling: AdapterConfig.load("pfeiffer", reduction_factor=16)."""
        return cls(architecture=name, **overrides)  # the constructor checks the name


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
        self.num_virtual_tokens = _check_positive_int(self, "num_virtual_tokens")
        self.prefix_projection = _check_bool(self, "prefix_projection")
        self.encoder_hidden_size = _check_optional_positive_int(self, "encoder_hidden_size")
        self.base_model = _check_base_model(self)


PROMPT_INITS = ("TEXT", "RANDOM", "SAMPLE_VOCAB")


@dataclass
class PromptTuningConfig(PeftConfig):
    """Prompt tuning: n learned input embeddings prepended to the token embeddings."""

    method: ClassVar[str] = "prompt"
    kind: ClassVar[str] = "input"
    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None  # required by "TEXT", ignored (and kept) by the others, as in peft
    # anything with .encode(str) -> token ids; used at init, never saved
    tokenizer: Any = field(default=None, repr=False, compare=False, metadata={"save": False})
    base_model: dict | None = None

    def validate(self) -> None:
        self.num_virtual_tokens = _check_positive_int(self, "num_virtual_tokens")
        self.prompt_tuning_init = _check_choice(self, "prompt_tuning_init", PROMPT_INITS)
        self.prompt_tuning_init_text = _check_optional_text(self, "prompt_tuning_init_text")
        if self.prompt_tuning_init == "TEXT" and self.prompt_tuning_init_text is None:
            raise ValueError("PromptTuningConfig.prompt_tuning_init_text (the text whose token embeddings start the "
                             "prompt) is required when prompt_tuning_init='TEXT', got None")
        if self.tokenizer is not None and not callable(getattr(self.tokenizer, "encode", None)):
            raise TypeError(f"PromptTuningConfig.tokenizer must be None or have an encode(text) method, "
                            f"{_got(self.tokenizer)}")
        self.base_model = _check_base_model(self)


ENCODER_TYPES = ("MLP", "LSTM")


@dataclass
class PTuningConfig(PeftConfig):
    """P-tuning: a prompt encoder (MLP or LSTM) turns n learned seeds into the virtual-token embeddings."""

    method: ClassVar[str] = "ptuning"
    kind: ClassVar[str] = "input"
    num_virtual_tokens: int = 20
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int = 128
    encoder_num_layers: int = 2  # the LSTM's layers; the MLP always has three Linears, as in peft
    encoder_dropout: float = 0.0
    base_model: dict | None = None

    def validate(self) -> None:
        self.num_virtual_tokens = _check_positive_int(self, "num_virtual_tokens")
        self.encoder_reparameterization_type = _check_choice(self, "encoder_reparameterization_type", ENCODER_TYPES)
        self.encoder_hidden_size = _check_positive_int(self, "encoder_hidden_size")
        self.encoder_num_layers = _check_positive_int(self, "encoder_num_layers")
        self.encoder_dropout = _check_probability(self, "encoder_dropout")
        self.base_model = _check_base_model(self)


@dataclass
class AdapterFusionConfig:
    """An AdapterFusion layer over existing bottleneck adapters (fusion.py); not an adapter itself, so not a
    PeftConfig. Saved as adapter_fusion_config.json by `PeftModel.save_adapter_fusion`.

    `fusion_type`: "dynamic" (query, key and value matrices; the library's default) or "static" (no value
    matrix). `dropout_prob`: on the attention scores; None at creation means the base's GPTConfig.dropout, and
    the value used is what is stored."""

    adapter_names: list[str]
    fusion_type: str = "dynamic"
    dropout_prob: float | None = None
    base_model: dict | None = None

    def __post_init__(self) -> None:
        where, names = "AdapterFusionConfig.adapter_names", self.adapter_names
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
            raise TypeError(f"{where} must be a list of adapter names, {_got(names)}")
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"{where} must name at least two different adapters, got {list(names)!r}")
        self.adapter_names = list(names)
        self.fusion_type = _check_choice(self, "fusion_type", FUSION_TYPES)
        self.dropout_prob = None if self.dropout_prob is None else _check_probability(self, "dropout_prob")
        self.base_model = _check_base_model(self)

    def to_dict(self) -> dict[str, Any]:
        return {"method": "adapter_fusion", **json.loads(json.dumps({f.name: getattr(self, f.name)
                                                                       for f in fields(self)}))}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> AdapterFusionConfig:
        if not isinstance(d, dict) or d.get("method") != "adapter_fusion":
            raise ValueError(f"not an adapter fusion config (expected 'method': 'adapter_fusion'), got {d!r}")
        d = {k: v for k, v in d.items() if k != "method"}
        known = {f.name for f in fields(AdapterFusionConfig)}
        if set(d) - known or "adapter_names" not in d:
            raise ValueError(f"AdapterFusionConfig got fields {sorted(d)}; known: {sorted(known)} (adapter_names "
                             f"required)")
        return AdapterFusionConfig(**d)


CONFIGS: dict[str, type[PeftConfig]] = {
    c.method: c for c in (LoraConfig, AdapterConfig, PrefixTuningConfig, PromptTuningConfig, PTuningConfig)
}
