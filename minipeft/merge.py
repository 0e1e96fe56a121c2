"""Merge a LoRA adapter into its base and write a plain GPT-2 checkpoint that transformers loads (`minipeft merge`).

LoRA's update is a matrix of the same shape as the weight it adapts, so it can be added in once:

    W' = W₀ + (α/r)·B·A        for every adapted layer; then  W'x = W₀x + (α/r)·B·A·x  exactly

and the result is an ordinary GPT-2: no adapter code, no extra latency. `merge_adapter` loads the base and
the adapter (minipeft's format or HF peft's), merges (`PeftModel.merge_and_unload`), and writes config.json +
model.safetensors in transformers' GPT-2 layout (`GPT.save_pretrained`), with the base's tokenizer files
copied beside them, so that `GPT2LMHeadModel.from_pretrained(MERGED)` gives the PeftModel's logits. Only LoRA
merges: the other methods add computation (a bottleneck, virtual tokens) that no weight of GPT-2 can hold.
A QLoRA adapter is merged into the dequantized NF4 weights it was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

from minipeft.checkpoint import check_output_dir, save_json
from minipeft.finetune_jsonl import copy_tokenizer_files, load_finetuned, read_run
from minipeft.tuners import LoraConfig


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Write base + LoRA adapter, merged, to `out` as a GPT-2 checkpoint; returns `out`.

    Raises:
        ValueError: `out` is the base directory or cannot be written, the adapter is not LoRA, or it does not
            fit the base (minipeft.tuners.io names the mismatch).
    """
    base, adapter, out = Path(base), Path(adapter), Path(out)
    check_output_dir(out, label="out")
    if out.resolve() in (base.resolve(), adapter.resolve()):
        raise ValueError(f"out {str(out)!r} is the base or the adapter directory; write the merged model elsewhere")
    model, _, _ = load_finetuned(base, adapter, device="cpu")
    methods = {c.method for c in model.peft_config.values()}
    if methods != {LoraConfig.method}:
        kind = read_run(adapter).get("method") or ", ".join(sorted(methods))
        raise ValueError(f"{str(adapter)!r} holds a {kind} adapter; only LoRA (and QLoRA) adapters merge into the "
                         "base weights. Use it unmerged: minipeft generate / evaluate --adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    _keep_token_ids(base, out)
    copy_tokenizer_files(base, out)
    return out


def _keep_token_ids(base: Path, out: Path) -> None:
    """The base's special-token ids (bos/eos/pad) into out's config.json, and its generation_config.json: GPT
    stores neither, and transformers would fall back to GPT-2's 50256, out of range for another vocabulary."""
    base_config = json.loads((base / "config.json").read_text())
    ids = {k: base_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in base_config}
    if ids:
        config = json.loads((out / "config.json").read_text())
        save_json({**config, **ids}, out / "config.json")
    generation = base / "generation_config.json"
    if generation.is_file():
        save_json(json.loads(generation.read_text()), out / "generation_config.json")
