"""Merge a LoRA adapter into its base and write a plain GPT-2 checkpoint that transformers loads (`minipeft merge`).

LoRA's update is a matrix of the same shape as the weight it adapts, so it can be added in once:

    W' = W₀ + (α/r)·B·A        for every adapted layer; then  W'x = W₀x + (α/r)·B·A·x  exactly

and the result is an ordinary GPT-2: no adapter code, no extra latency. `merge_adapter` loads the base and
the adapter (minipeft's format or HF peft's), merges (`PeftModel.merge_and_unload`), and writes config.json +
model.safetensors in transformers' GPT-2 layout (`GPT.save_pretrained`), with the base's tokenizer files and
special-token ids beside them (`finetune_jsonl.save_whole_model`), so that
`GPT2LMHeadModel.from_pretrained(MERGED)` gives the PeftModel's logits. Only LoRA
merges: the other methods add computation (a bottleneck, virtual tokens) that no weight of GPT-2 can hold.
A QLoRA adapter is merged into the dequantized NF4 weights it was trained on.
"""

from __future__ import annotations

from pathlib import Path

from minipeft.checkpoint import check_output_dir
from minipeft.finetune_jsonl import load_finetuned, read_run, save_whole_model
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
    save_whole_model(model.merge_and_unload(), base, out)
    return out

