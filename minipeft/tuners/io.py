"""Adapter files: two small files beside (never inside) the base model, saved as a whole; they can be HF peft's.

This module is the file format only: it turns a config and a dict of tensors into files and back, and knows
nothing of the model that holds the adapter (`PeftModel.save_adapter` / `load_adapter` / `from_pretrained`,
in inject.py, call it).

A trained adapter is a few thousand numbers on top of a base model that stays where it is, so an adapter
file holds **only the adapter's tensors** and the config that says how to attach them:

    out/sentiment/
        adapter_config.json          the PeftConfig as JSON: {"method": "lora", "r": 8, …, "base_model": {…}}
        adapter_model.safetensors    the tensors of `PeftModel.adapter_state_dict(name)`, nothing else
        adapter_manifest.json        written last: the other two files' sha256 and size (the commit record)

The same two file names as HF peft (https://huggingface.co/docs/peft/developer_guides/checkpoint), so a
directory reads the same to a peft user. `base_model` is the fingerprint of the base the adapter was made
for (its GPTConfig as a dict): loading checks it and refuses an adapter made for another base by name,
field by field, instead of failing later with a shape error or, worse, silently computing nonsense.

Why safetensors (https://huggingface.co/docs/safetensors): the file is a JSON header plus raw tensor bytes,
so loading it can only ever produce tensors. A pickle (`torch.save`, peft's old `adapter_model.bin`) is a
program that `torch.load` runs; minipeft never unpickles anything and refuses a directory that holds only
`adapter_model.bin`.

A directory is written as a whole. Each file is written atomically (`minipeft.checkpoint`: a temporary file
in the same directory, fsync, one `os.replace`), so a crash leaves the old file or the new one, never half of
one. But an adapter is two files, and `os.replace` cannot swap a non-empty directory: a crash between them
would leave the new tensors beside the old config, which loads without an error and computes nonsense (a
LoRA saved with α/r = 16.0 scaled by the old 2.0). So a save writes three files, each atomically, in order:

    1. adapter_model.safetensors
    2. adapter_config.json
    3. adapter_manifest.json     {"manifest_version": 1,
                                  "files": {"adapter_config.json": {"sha256": "…", "size": 412}, …}}

The manifest is the commit record, as in a database's log or a git commit: the save has happened when, and
only when, a manifest naming its files' hashes is in place. Until then the directory holds the previous
save's manifest, which names the previous files' hashes, so a file already replaced by the unfinished save
no longer matches it: loading refuses the directory (a ValueError naming the directory and the file; re-save
it) instead of mixing two saves. When everything matches, the files are one save's, whole. Loading reads each
file once and both hashes and parses those same bytes, so a save that runs while a load reads also ends in a
match or a refusal. After a power cut the renames may reach the disk in another order than they were made;
the hashes turn that into a refusal too, never into a mix.

- A directory without a manifest (written by HF peft, or by a minipeft older than the manifest) loads
  unchecked, as it always did. A manifest that a tool which does not know it left stale (HF peft's
  `save_pretrained` into a directory minipeft wrote; a config edited by hand) is refused like a crash:
  delete adapter_manifest.json to load such files unchecked.
- A save killed mid-write leaves a temporary file (`.adapter_model.safetensors.k3j9x_2a.tmp`); the next
  save of that file removes it (`checkpoint.remove_orphan_temporaries`, called by every atomic write).

Loading is strict, because an adapter that attaches to the wrong model still runs:
- the JSON must parse and describe a known method (a ValueError names the file otherwise);
- the base fingerprint must match the model's (`dropout` aside: it is a training setting, not the base);
- with a manifest, every file's sha256 and size must be the manifest's (the files are one save's, above);
- a truncated or corrupt safetensors file raises a ValueError (not safetensors' own error type);
- every tensor's key and shape must be the adapter's; the first that is not raises a ValueError naming it;
- (in `PeftModel.load_adapter`) a LoRA adapter's target modules must all be in the model; the adapter is
  added *without* being activated (`from_pretrained` activates it); if anything fails after it was added,
  it is deleted again, so a failed load leaves the model exactly as it was. Loading does not move torch's
  global random stream (the fresh adapter's init draws are thrown away anyway).

HF peft interop (GPT-2 loaded with `GPT.from_pretrained`; peft's `PeftModel.save_pretrained` /
`PeftModel.from_pretrained`, https://huggingface.co/docs/peft/package_reference/peft_model). A peft
`adapter_config.json` has a `peft_type`; that is how `load_adapter` tells the formats apart.

    peft file                           minipeft adapter
    LORA: base_model.model.<m>.lora_A.weight (r, in)   →  <m>.lora_A.weight     (nn.Linear layout)
          base_model.model.<m>.lora_B.weight (out, r)  →  <m>.lora_B.weight
    PROMPT_TUNING / P_TUNING: prompt_embeddings (n, C) →  prompt tuning's `prompt_embeddings`
    PREFIX_TUNING: prompt_embeddings (n, L·2·C)        →  prefix tuning's `prefix_embeddings`

- LoRA on GPT-2's Conv1D: transformers' Conv1D stores its weight (in, out), the transpose of nn.Linear,
  and peft marks it `fan_in_fan_out=True`. That flag only tells peft to transpose ΔW = B·A before *merging*
  it into the Conv1D weight; the LoRA factors themselves are two plain Linears, lora_A (r, in) and
  lora_B (out, r), for Conv1D exactly as for Linear. So no tensor is transposed either way. The targeted
  modules are read from the tensor keys (what peft actually wrapped), not re-matched from `target_modules`.
- Prompt tuning: peft prepends the n virtual tokens and gives them positions 0…n−1, like minipeft; peft's
  tensor is (n·num_transformer_submodules, C) and a decoder-only GPT-2 has one submodule. P-tuning files
  hold the encoder's *output* (peft evaluates the encoder when it saves), so they load as a plain soft prompt.
- Prefix tuning: the flat (n, L·2·C) layout of prefix.py, which is peft's (view(n, 2L, nh, hs): layer l's
  key is slice 2l, its value 2l+1); peft puts it in a DynamicCache, so real tokens take positions n…n+T−1,
  as in minipeft. With `prefix_projection` peft saves the MLP's output, which loads as a plain prefix.
- `write_adapter(..., format="peft")` writes the reverse: LoRA as LORA; prompt tuning and P-tuning as
  PROMPT_TUNING (P-tuning's encoder evaluated once: at inference it *is* a soft prompt); prefix tuning as
  PREFIX_TUNING without projection (the MLP evaluated once). Bottleneck adapters have no peft counterpart.
  The minipeft base fingerprint travels in the safetensors metadata (peft ignores it), so a peft-format
  file written by minipeft is still checked against its base when minipeft loads it back.

Fusions and compositions (composition.py, fusion.py). An AdapterFusion layer is saved like an adapter, under
its own three names, so that it may share a directory with one: adapter_fusion.safetensors (its tensors, keyed
`transformer.h.0.mlp.fusion_query.weight`, …), adapter_fusion_config.json (an AdapterFusionConfig naming the
fused adapters, with the base fingerprint) and, last, adapter_fusion_manifest.json; loading checks them as an
adapter's. `PeftModel.save_pretrained` adds adapter_composition.json, written atomically after everything else,
when what it saved is more than "default" alone active:

    {"composition_version": 1, "adapters": ["default", "b"], "fusions": ["a,b"], "active": <block> | null}

Adapters and fusions sit where HF peft's layout puts them ("default" in the directory, any other name X in
X/), so the file stores names, never paths, and a name that would leave the directory is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes

from minipeft.checkpoint import WrittenFile, save_json, save_safetensors
from minipeft.targets import is_lm_head
from minipeft.tuners.composition import AdapterCompositionBlock, composition_from_dict
from minipeft.tuners.config import (
    PROMPT_INITS,
    AdapterFusionConfig,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
)

__all__ = ["write_adapter", "read_adapter", "check_format", "CONFIG_NAME", "WEIGHTS_NAME", "MANIFEST_NAME",
           "FORMATS", "write_fusion", "read_fusion", "write_composition", "read_composition", "remove_composition",
           "SavedComposition", "FUSION_CONFIG_NAME", "FUSION_WEIGHTS_NAME", "FUSION_MANIFEST_NAME", "COMPOSITION_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MANIFEST_NAME = "adapter_manifest.json"  # written last: the commit record of a save (see the module docstring)
MANIFEST_VERSION = 1
FUSION_CONFIG_NAME = "adapter_fusion_config.json"
FUSION_WEIGHTS_NAME = "adapter_fusion.safetensors"
FUSION_MANIFEST_NAME = "adapter_fusion_manifest.json"
COMPOSITION_NAME = "adapter_composition.json"  # save_pretrained's adapters, fusions and active composition
COMPOSITION_VERSION = 1
PICKLE_NAME = "adapter_model.bin"  # peft's old pickle format: refused, never opened
FORMATS = ("minipeft", "peft")

_PEFT_PREFIX = "base_model.model."  # peft's key prefix for layer methods: PeftModel.base_model (LoraModel).model
_PEFT_INPUT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
_PEFT_TYPES = ("LORA", *_PEFT_INPUT_TYPES)
_BASE_METADATA_KEY = "minipeft_base_model"  # the base fingerprint, as JSON, in a peft-format file's metadata
_NOT_PART_OF_BASE = ("dropout",)  # GPTConfig fields that do not change which weights an adapter fits

# peft LoraConfig fields that change what the tensors mean or which tensors exist; minipeft loads a file only
# when each is at its neutral value (None, False, "none", {} or []).
_PEFT_LORA_UNSUPPORTED = (
    "use_dora", "bias", "lora_bias", "rank_pattern", "alpha_pattern", "layer_replication", "modules_to_save",
    "trainable_token_indices", "target_parameters", "alora_invocation_tokens", "use_qalora", "use_bdlora",
)

# peft init_lora_weights values that leave W₀ as it was; the others (pissa, olora, corda, loftq, …) change W₀.
_PEFT_LORA_INITS_ON_AN_UNCHANGED_BASE = (True, False, "gaussian", "eva", "orthogonal")


# ---------------------------------------------------------------------------------------------- saving
def check_format(config: PeftConfig, format: str, base_model_name_or_path: str | None = None) -> None:
    """ValueError unless an adapter of `config`'s method can be written in `format` ("minipeft": every method;
    "peft": the methods HF peft has, so not the bottleneck adapters), with `base_model_name_or_path` (a str,
    for "peft" only). Callers that train before they save ask first."""
    if not isinstance(config, PeftConfig):
        raise TypeError(f"config must be a PeftConfig (LoraConfig, …), got {type(config).__name__}; a dict from "
                        "adapter_config.json becomes one with PeftConfig.from_dict")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "peft" and not isinstance(config, (LoraConfig, PrefixTuningConfig, PromptTuningConfig,
                                                     PTuningConfig)):
        raise ValueError(f"this is a {config.method!r} adapter, which HF peft has no format for (peft-format "
                         f"export covers lora, prompt, ptuning and prefix); save it with format='minipeft'")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(f"base_model_name_or_path must be a str (a local directory or a Hub id) or None, got "
                        f"{type(base_model_name_or_path).__name__} {base_model_name_or_path!r}")
    if format == "minipeft" and base_model_name_or_path is not None:
        raise ValueError("base_model_name_or_path is written in peft-format files only (format='peft'); the "
                         "minipeft format records the base by its fingerprint")


def write_adapter(
    directory: str | Path,
    config: PeftConfig,
    tensors: dict[str, torch.Tensor],
    format: str = "minipeft",
    base_model_name_or_path: str | None = None,
) -> None:
    """Write one adapter to `directory` as adapter_model.safetensors, adapter_config.json and, last, the
    manifest adapter_manifest.json that makes the three one save (see the module docstring).

    Args:
        directory: created if needed; files already there with the same names are replaced (atomically), and
            temporary files that killed saves of them left are removed.
        config: the adapter's config; its `base_model` fingerprint is written with it.
        tensors: the adapter's tensors keyed as `PeftModel.adapter_state_dict`; for format="peft" an input
            method's tensors in their folded form (a re-parametrised prompt or prefix evaluated once).
        format: "minipeft" (the config's `to_dict()`, every method) or "peft" (files HF peft's
            `PeftModel.from_pretrained` reads on a transformers GPT-2; see the module docstring).
        base_model_name_or_path: "peft" only: what peft's config records as the base (a local directory or
            a Hub id); minipeft does not know where its base came from, so it is None unless given.

    Raises:
        TypeError: a config that is not a PeftConfig, tensors that are not a dict of tensors.
        ValueError: an unknown format, a method that HF peft does not have (bottleneck),
            base_model_name_or_path with the minipeft format, a config without its base_model fingerprint
            (no load would accept the files), or a tensor holding NaN or inf. Nothing is written then.
    """
    check_format(config, format, base_model_name_or_path)
    _check_to_write(config.base_model, tensors, "write_adapter")
    if format == "peft":
        file_config, tensors = _to_peft(config, tensors)
        file_config["base_model_name_or_path"] = base_model_name_or_path
        metadata = {"format": "pt", _BASE_METADATA_KEY: json.dumps(config.base_model, sort_keys=True)}
    else:
        file_config, metadata = config.to_dict(), {"format": "pt"}
    _write_as_one_save(Path(directory), tensors, metadata, file_config, (WEIGHTS_NAME, CONFIG_NAME, MANIFEST_NAME))


def _check_to_write(base_model: dict[str, Any] | None, tensors: Any, what: str) -> None:
    """What write_adapter and write_fusion refuse before they write: a config without the base fingerprint that
    loading checks, tensors that are not a dict of tensors or that hold NaN or inf (no load accepts them)."""
    if base_model is None:
        raise ValueError(f"{what}: config.base_model is None; files are saved with the fingerprint of their base "
                         "(GPTConfig.to_dict()), which loading checks (PeftModel.save_adapter sets it)")
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise TypeError(f"{what}: tensors must be a dict of name → torch.Tensor, got {type(tensors).__name__}")
    for key, value in tensors.items():
        bad = int((~torch.isfinite(value)).sum()) if value.is_floating_point() else 0
        if bad:
            raise ValueError(f"{what}: tensor {key!r} holds NaN or inf ({bad} of {value.numel()} entries); nothing "
                             "was written")


def _write_as_one_save(directory: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                       file_config: dict[str, Any], names: tuple[str, str, str]) -> None:
    """The tensors, then the config, then the manifest naming both (the commit record): each atomically."""
    weights_name, config_name, manifest_name = names
    tensors = {k: v.detach().to("cpu").clone() for k, v in tensors.items()}  # own storage: nothing shared
    written = [save_safetensors(tensors, directory / weights_name, metadata=metadata),
               save_json(file_config, directory / config_name)]
    save_json(_manifest(written), directory / manifest_name)  # last: until it is in place, the save did not happen


def _manifest(written: list[WrittenFile]) -> dict[str, Any]:
    """The manifest of one save: each file's sha256 and size, as `atomic_write` hashed the bytes it wrote."""
    return {"manifest_version": MANIFEST_VERSION,
            "files": {f.name: {"sha256": f.sha256, "size": f.size} for f in written}}


def _to_peft(config: PeftConfig, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """peft's adapter_config.json fields and tensors for one adapter (see the module docstring)."""
    base = config.base_model
    common = {"task_type": "CAUSAL_LM", "inference_mode": True, "revision": None, "modules_to_save": None}
    if isinstance(config, LoraConfig):
        tensors = {_PEFT_PREFIX + k: v for k, v in tensors.items()}
        modules = sorted({k[len(_PEFT_PREFIX):].rsplit(".", 2)[0] for k in tensors})  # what the adapter wraps
        # GPT-2 stores every projection except lm_head as a Conv1D; peft corrects the flag per layer anyway.
        conv1d = any(not is_lm_head(m) for m in modules)
        return {**common, "peft_type": "LORA", "r": config.r, "lora_alpha": config.lora_alpha,
                "lora_dropout": config.lora_dropout, "use_rslora": config.use_rslora,
                "target_modules": modules, "fan_in_fan_out": conv1d, "bias": "none", "use_dora": False,
                "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
                "rank_pattern": {}, "alpha_pattern": {}}, tensors
    prompt_learning = {**common, "num_virtual_tokens": config.num_virtual_tokens, "token_dim": base["n_embd"],
                       "num_transformer_submodules": 1, "num_attention_heads": base["n_head"],
                       "num_layers": base["n_layer"]}
    if isinstance(config, PrefixTuningConfig):  # the folded prefix (n, L·2·C): peft's layout
        return {**prompt_learning, "peft_type": "PREFIX_TUNING", "encoder_hidden_size": base["n_embd"],
                "prefix_projection": False, "init_weights": None}, {"prompt_embeddings": tensors["prefix_embeddings"]}
    # prompt tuning, and P-tuning folded to its encoder's output: a soft prompt (n, C). peft's TEXT init wants
    # a tokenizer path to validate; the weights are in the file, so say RANDOM.
    return {**prompt_learning, "peft_type": "PROMPT_TUNING", "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "tokenizer_kwargs": None}, \
        {"prompt_embeddings": tensors["prompt_embeddings"]}


# ---------------------------------------------------------------------------------------------- fusions
def write_fusion(directory: str | Path, config: AdapterFusionConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Write one AdapterFusion layer set: adapter_fusion.safetensors, adapter_fusion_config.json, then the
    manifest adapter_fusion_manifest.json (the module docstring). `config.base_model` must be set."""
    if not isinstance(config, AdapterFusionConfig):
        raise TypeError(f"config must be an AdapterFusionConfig, got {type(config).__name__}")
    _check_to_write(config.base_model, tensors, "write_fusion")
    _write_as_one_save(Path(directory), tensors, {"format": "pt"}, config.to_dict(),
                       (FUSION_WEIGHTS_NAME, FUSION_CONFIG_NAME, FUSION_MANIFEST_NAME))


def read_fusion(directory: str | Path,
                base: dict[str, Any]) -> tuple[AdapterFusionConfig, dict[str, torch.Tensor], str]:
    """(config, tensors, the weights file's path) of the fusion saved in `directory`, checked as an adapter's
    files are (manifest, JSON, base fingerprint, floating-point tensors); a ValueError naming the file otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"adapter fusion directory {str(directory)!r} does not exist or is not a directory")
    for name in (FUSION_CONFIG_NAME, FUSION_WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise ValueError(f"{str(directory)!r} has no {name}: not an adapter fusion saved by save_adapter_fusion; "
                             f"found {sorted(p.name for p in directory.iterdir())}")
    data = _read_as_one_save(directory, (FUSION_CONFIG_NAME, FUSION_WEIGHTS_NAME), FUSION_MANIFEST_NAME)
    config_path, weights_path = directory / FUSION_CONFIG_NAME, directory / FUSION_WEIGHTS_NAME
    try:
        config = AdapterFusionConfig.from_dict(_parse_json(data[FUSION_CONFIG_NAME], config_path))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: not a valid adapter fusion config: {e}") from e
    if config.base_model is None:
        raise ValueError(f"{config_path} has no 'base_model' fingerprint, so it cannot be checked against this model")
    _check_base(config.base_model, base, config_path)
    tensors, _ = _parse_tensors(data[FUSION_WEIGHTS_NAME], weights_path)
    return config, tensors, str(weights_path)


# ---------------------------------------------------------------------------------------------- compositions
@dataclasses.dataclass(frozen=True)
class SavedComposition:
    """What adapter_composition.json records: the adapters and fusions saved beside it (by name, in the order
    to load them) and the composition that was active (None: none was)."""

    adapters: list[str]
    fusions: list[str]
    active: AdapterCompositionBlock | None


def subdirectory(name: str) -> str:
    """Where save_pretrained puts adapter or fusion `name`, as HF peft lays adapters out: "default" in the
    directory itself, any other name in a folder of that name."""
    return "." if name == "default" else name


def write_composition(directory: str | Path, saved: SavedComposition) -> None:
    """Write adapter_composition.json (atomically)."""
    save_json({"composition_version": COMPOSITION_VERSION, "adapters": list(saved.adapters),
               "fusions": list(saved.fusions), "active": None if saved.active is None else saved.active.to_dict()},
              Path(directory) / COMPOSITION_NAME)


def remove_composition(directory: str | Path) -> None:
    """Remove a stale adapter_composition.json (a save that no longer needs one), if there is one."""
    (Path(directory) / COMPOSITION_NAME).unlink(missing_ok=True)


def read_composition(directory: str | Path) -> SavedComposition | None:
    """adapter_composition.json of a save_pretrained directory, checked; None when the directory has none."""
    path = Path(directory) / COMPOSITION_NAME
    if not path.is_file():
        return None
    raw = _parse_json(_read_bytes(path), path)
    if raw.get("composition_version") != COMPOSITION_VERSION:
        raise ValueError(f"{path}: composition_version {raw.get('composition_version')!r} is not "
                         f"{COMPOSITION_VERSION}; written by another minipeft?")
    lists = {key: raw.get(key) for key in ("adapters", "fusions")}
    for key, names in lists.items():
        if not isinstance(names, list) or not all(_stays_inside(n) for n in names):
            raise ValueError(f"{path}: {key!r} must be a list of names (no '.', not a path), got {names!r}")
    if not lists["adapters"]:
        raise ValueError(f"{path} names no adapter")
    try:
        active = None if raw.get("active") is None else composition_from_dict(raw["active"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return SavedComposition(lists["adapters"], lists["fusions"], active)


def _stays_inside(name: Any) -> bool:
    """A name that, as a folder name, stays inside the directory: a non-empty str, no '.', no path root."""
    return isinstance(name, str) and bool(name) and "." not in name and not Path(name).is_absolute() \
        and not name.startswith(("/", "\\"))


# ---------------------------------------------------------------------------------------------- loading
def read_adapter(directory: str | Path, base: dict[str, Any]) -> tuple[PeftConfig, dict[str, torch.Tensor], str]:
    """(minipeft config, tensors keyed as `adapter_state_dict`, the weights file's path) for an adapter
    directory in either format, checked against `base`, the fingerprint of the model it is for (its
    `GPTConfig.to_dict()`).

    Raises:
        ValueError: a missing or unreadable file, a pickle-only directory, files that do not match the
            directory's manifest (parts of different saves, or changed since: the directory and each file are
            named), an unreadable manifest, an unknown method, an adapter made for a different base (both
            fingerprints named), or tensors that are not floating point.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"adapter directory {str(directory)!r} does not exist or is not a directory")
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    found = sorted(p.name for p in directory.iterdir())
    if not weights_path.is_file():
        if (directory / PICKLE_NAME).is_file():
            raise ValueError(f"{str(directory)!r} holds only {PICKLE_NAME}, a pickle; loading a pickle runs code "
                             f"from the file, so minipeft never does. Re-save it as safetensors (peft: "
                             f"save_pretrained(..., safe_serialization=True), the default)")
        raise ValueError(f"{str(directory)!r} has no {WEIGHTS_NAME}; found {found}")
    if not config_path.is_file():
        raise ValueError(f"{str(directory)!r} has no {CONFIG_NAME}; found {found}")
    data = _read_as_one_save(directory, (CONFIG_NAME, WEIGHTS_NAME), MANIFEST_NAME)
    raw = _parse_json(data[CONFIG_NAME], config_path)
    if "peft_type" in raw:
        config = _config_from_peft(raw, base, config_path)
        tensors, metadata = _parse_tensors(data[WEIGHTS_NAME], weights_path)
        if _BASE_METADATA_KEY in metadata:  # written by minipeft: check the base as for the minipeft format
            try:
                saved = json.loads(metadata[_BASE_METADATA_KEY])
            except ValueError as e:
                raise ValueError(f"{weights_path}: metadata {_BASE_METADATA_KEY!r} is not JSON: {e}") from e
            _check_base(saved, base, weights_path)
        tensors = _tensors_from_peft(raw["peft_type"], tensors, weights_path)
        if isinstance(config, LoraConfig):  # the modules peft actually wrapped, by their full names
            modules = sorted({key.rsplit(".", 2)[0] for key in tensors})
            if not modules:
                raise ValueError(f"{weights_path} holds no LoRA tensors")
            config = dataclasses.replace(config, target_modules=modules)
    elif "method" in raw:
        try:
            config = PeftConfig.from_dict(raw)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{config_path}: not a valid adapter config: {e}") from e
        if config.base_model is None:
            raise ValueError(f"{config_path} has no 'base_model' fingerprint, so it cannot be checked against "
                             f"this model; minipeft's save_adapter always writes one")
        _check_base(config.base_model, base, config_path)
        tensors, _ = _parse_tensors(data[WEIGHTS_NAME], weights_path)
    else:
        raise ValueError(f"{config_path} is neither a minipeft adapter config (no 'method') nor an HF peft one (no "
                         f"'peft_type'); its keys: {sorted(raw)[:12]}")
    return config, tensors, str(weights_path)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path} cannot be read: {e}") from e


def _read_as_one_save(directory: Path, names: tuple[str, str], manifest_name: str) -> dict[str, bytes]:
    """The bytes of each file in `names`, checked against the manifest when there is one (module docstring).
    Each file is read once, the manifest first; what is checked against it is what is parsed."""
    manifest_path = directory / manifest_name
    manifest = _read_manifest(manifest_path, names) if manifest_path.is_file() else None
    data = {name: _read_bytes(directory / name) for name in names}
    if manifest is not None:
        _check_manifest(directory, manifest, data, manifest_name)
    return data


def _read_manifest(path: Path, names: tuple[str, str]) -> dict[str, tuple[str, int]]:
    """{file name: (sha256, size)} from a manifest; a ValueError for anything write_adapter does not write (a
    manifest is never half-written, so a bad one was changed by hand or by a newer minipeft)."""
    raw = _parse_json(_read_bytes(path), path)
    version, files = raw.get("manifest_version"), raw.get("files")
    fix = f"re-save the adapter into {str(path.parent)!r}, or delete {path.name} to load the files unchecked"
    if isinstance(version, int) and not isinstance(version, bool) and version > MANIFEST_VERSION:
        raise ValueError(f"{path} has manifest_version {version}: written by a newer minipeft (this one reads "
                         f"version {MANIFEST_VERSION}); upgrade minipeft, or {fix}")
    if version != MANIFEST_VERSION:
        raise ValueError(f"{path} is not an adapter manifest (manifest_version {version!r}, expected "
                         f"{MANIFEST_VERSION}); {fix}")
    if not isinstance(files, dict) or sorted(files) != sorted(names):
        listed = sorted(files) if isinstance(files, dict) else files
        raise ValueError(f"{path} must list exactly {list(names)} under 'files', got {listed!r}; {fix}")
    out = {}
    for name, entry in files.items():
        sha, size = (entry.get("sha256"), entry.get("size")) if isinstance(entry, dict) else (None, None)
        if not (isinstance(sha, str) and len(sha) == 64 and isinstance(size, int) and not isinstance(size, bool)):
            raise ValueError(f"{path}: the entry for {name} must be {{'sha256': <64 hex digits>, 'size': <int>}}, "
                             f"got {entry!r}; {fix}")
        out[name] = (sha.lower(), size)
    return out


def _check_manifest(directory: Path, manifest: dict[str, tuple[str, int]], data: dict[str, bytes],
                    manifest_name: str) -> None:
    """ValueError naming the directory and every file whose bytes are not the ones the manifest records."""
    found = {name: (hashlib.sha256(data[name]).hexdigest(), len(data[name])) for name in manifest}
    bad = [name for name in manifest if found[name] != manifest[name]]
    if not bad:
        return
    details = "; ".join(f"{name}: {found[name][1]} bytes, sha256 {found[name][0][:16]}… on disk, the manifest "
                        f"records {manifest[name][1]} bytes, sha256 {manifest[name][0][:16]}…" for name in bad)
    files = " and ".join(bad)
    raise ValueError(
        f"adapter directory {str(directory)!r}: {files} {'does' if len(bad) == 1 else 'do'} not match {manifest_name} "
        f"({details}). The files are not one save's (a save was interrupted, or a file was changed after it), "
        f"and loading them could mix two adapters. Re-save the adapter into this directory. If the change was "
        f"meant (you edited a file, or a tool that does not write the manifest, such as HF peft's "
        f"save_pretrained, wrote the files), delete {manifest_name} to load the files unchecked")


def _parse_json(data: bytes, path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(data.decode("utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not valid JSON (truncated or corrupt?): {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _parse_tensors(data: bytes, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor (on CPU) and the metadata of a safetensors file's bytes; any failure is a ValueError."""
    try:
        tensors = dict(sorted(load_safetensors_bytes(data).items()))  # by name, as safe_open lists them
        # the format: an 8-byte little-endian header length, then the JSON header (valid: load read it)
        header_len = int.from_bytes(data[:8], "little")
        metadata = dict(json.loads(data[8:8 + header_len]).get("__metadata__") or {})
    except Exception as e:  # safetensors' SafetensorError, …: one error type for the caller
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from e
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise ValueError(f"{path}: tensor {key!r} has dtype {value.dtype}; adapter tensors are floating point")
    return tensors, metadata


def _check_base(saved: dict[str, Any], actual: dict[str, Any], path: Path | str) -> None:
    """ValueError naming both fingerprints when `saved` is not the `actual` base (dropout aside)."""
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: the base fingerprint must be a dict like {actual}, got {saved!r}")
    keys = (set(saved) | set(actual)) - set(_NOT_PART_OF_BASE)
    diff = {k: (saved.get(k), actual.get(k)) for k in sorted(keys) if saved.get(k) != actual.get(k)}
    if diff:
        pairs = ", ".join(f"{k}: file {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        file_base, model_base = json.dumps(saved, sort_keys=True), json.dumps(actual, sort_keys=True)
        raise ValueError(f"{path} holds an adapter made for a different base model ({pairs}). The file's base: "
                         f"{file_base}; this model's base: {model_base}")


def _config_from_peft(raw: dict[str, Any], base: dict[str, Any], path: Path) -> PeftConfig:
    """The minipeft config equivalent to HF peft's adapter_config.json `raw` on the base `base` (a GPTConfig
    as a dict)."""
    peft_type = raw.get("peft_type")
    if peft_type not in _PEFT_TYPES:
        raise ValueError(f"{path}: peft_type {peft_type!r} is not supported; minipeft reads {list(_PEFT_TYPES)}")
    if raw.get("modules_to_save"):
        raise ValueError(f"{path}: the file also stores full copies of modules_to_save={raw['modules_to_save']}, "
                         f"which minipeft does not load")
    try:
        if peft_type == "LORA":
            unsupported = {k: raw[k] for k in _PEFT_LORA_UNSUPPORTED if raw.get(k) not in (None, False, "none", {}, [])}
            if unsupported:
                raise ValueError(f"LoRA options minipeft does not implement are set: {unsupported}")
            init = raw.get("init_lora_weights", True)
            if init not in _PEFT_LORA_INITS_ON_AN_UNCHANGED_BASE:
                raise ValueError(f"init_lora_weights={init!r} initialises LoRA by changing the base weights "
                                 f"themselves (PiSSA, OLoRA, CorDA, LoftQ), so these tensors need that changed base; "
                                 f"save them from peft with path_initial_model_for_weight_conversion, which "
                                 f"rewrites them for the original base")
            # target_modules: a placeholder that read_adapter replaces by the modules named in the tensor keys
            return LoraConfig(r=raw["r"], lora_alpha=raw["lora_alpha"],
                              lora_dropout=float(raw.get("lora_dropout", 0.0)),
                              use_rslora=bool(raw.get("use_rslora", False)), target_modules=["(from the tensors)"])
        n, ns = raw["num_virtual_tokens"], raw.get("num_transformer_submodules", 1) or 1
        if ns != 1:
            raise ValueError(f"num_transformer_submodules is {ns}: an encoder-decoder adapter; GPT-2 has 1")
        token_dim = raw.get("token_dim")
        if token_dim != base["n_embd"]:
            raise ValueError(f"token_dim is {token_dim} but the model's n_embd is {base['n_embd']}: a different base")
        if peft_type == "PREFIX_TUNING":
            for key, mine in (("num_layers", base["n_layer"]), ("num_attention_heads", base["n_head"])):
                if raw.get(key) != mine:
                    raise ValueError(f"{key} is {raw.get(key)} but the model has {mine}: a different base")
            return PrefixTuningConfig(num_virtual_tokens=n, prefix_projection=False)  # the file holds the prefix
        init, text = raw.get("prompt_tuning_init", "RANDOM"), raw.get("prompt_tuning_init_text")
        if init not in PROMPT_INITS or (init == "TEXT" and not text):  # P-tuning has none: its output is stored
            init, text = "RANDOM", None
        return PromptTuningConfig(num_virtual_tokens=n, prompt_tuning_init=init, prompt_tuning_init_text=text)
    except (KeyError, TypeError, ValueError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"{path}: cannot read this HF peft {peft_type} config: {what}") from e


def _tensors_from_peft(peft_type: str, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """peft's tensor keys → minipeft's `adapter_state_dict` keys (no tensor is transposed: see the docstring)."""
    if peft_type == "LORA":
        out = {}
        for key, value in tensors.items():
            if not (key.startswith(_PEFT_PREFIX) and key.endswith((".lora_A.weight", ".lora_B.weight"))):
                raise ValueError(f"{path}: unexpected tensor {key!r}; a peft LoRA file for minipeft holds only "
                                 f"{_PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight")
            out[key[len(_PEFT_PREFIX):]] = value
        return out
    unexpected = sorted(set(tensors) - {"prompt_embeddings"})
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor {unexpected[0]!r}; a peft {peft_type} file holds only "
                         f"'prompt_embeddings'")
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"{path}: tensor 'prompt_embeddings' is missing")
    name = "prefix_embeddings" if peft_type == "PREFIX_TUNING" else "prompt_embeddings"
    return {name: tensors["prompt_embeddings"]}
