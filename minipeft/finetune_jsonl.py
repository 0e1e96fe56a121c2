"""Your model, your data: fine-tune a local GPT-2 checkpoint on your own JSONL (`minipeft finetune --base`).

The same pieces as the built-in path, joined for a user's files:

    GPT.from_pretrained(DIR)           the base: config.json + *.safetensors, as transformers saves GPT-2
    load_tokenizer(DIR)                DIR/tokenizer.json (BPE, via `tokenizers`), else the byte tokenizer
    load_jsonl(TRAIN.jsonl)            rows → token ids; the format from the keys (minipeft/jsonl.py)
    apply_method(method, options)      LoRA, adapters, prefix, prompt, P-tuning, QLoRA or full (minipeft/methods.py)
    train(...)                         the one training loop: tqdm, OUT/metrics.jsonl, OUT/loss.png,
                                       a checkpoint every `save_every` steps, `resume` (minipeft/train.py)
    save_adapter(OUT, format=...)      minipeft's files, or HF peft's (`format="peft"`)

Everything that can be checked without training is checked first, cheapest first (the output directory,
the method's options, whether HF peft has a format for the method, the tokenizer, the data files), so a bad
run fails in seconds, not after an hour. Under torchrun the run is data-parallel (DDP) or sharded (`fsdp`),
as `minipeft.finetune` explains; rank 0 writes every file.

OUT ends up holding the adapter (or, for full fine-tuning, a whole GPT-2 checkpoint with the base's tokenizer
files), metrics.jsonl, loss.png, checkpoints/ (when save_every > 0) and run.json: what was trained, on what,
with which labels, and the final metrics. `load_finetuned(DIR, OUT)` reads it all back (for `minipeft
generate` and `minipeft evaluate`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from minipeft.checkpoint import atomic_write, check_output_dir, save_json
from minipeft.data import JsonlDataset, dataset_loss, load_jsonl
from minipeft.evaluate import evaluate_dataset
from minipeft.finetune import full_state_dict, init_distributed, shard_fsdp
from minipeft.methods import METHODS, MethodOptions, apply_method, method_config
from minipeft.model import GPT
from minipeft.quant import quantize_model
from minipeft.run_log import METRICS_NAME, PLOT_NAME
from minipeft.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from minipeft.train import TrainConfig, resolve_device, train
from minipeft.train_state import latest_checkpoint
from minipeft.tuners import PeftModel
from minipeft.tuners.io import CONFIG_NAME, MANIFEST_NAME, WEIGHTS_NAME, check_format

logger = logging.getLogger(__name__)

RUN_NAME = "run.json"
# what transformers' GPT-2 tokenizers keep beside the weights; copied with a merged or fully fine-tuned model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
# the files a run may write directly in OUT, whatever the method and format (an input file there would be lost)
OUTPUT_FILES = (RUN_NAME, METRICS_NAME, PLOT_NAME, CONFIG_NAME, WEIGHTS_NAME, MANIFEST_NAME, "config.json",
                "model.safetensors", "generation_config.json", *TOKENIZER_FILES)


def steps_for_epochs(epochs: float, rows: int, batch_size: int, grad_accum: int = 1) -> int:
    """Optimizer steps for `epochs` passes over `rows` rows: ⌈epochs · rows / (batch_size · grad_accum)⌉."""
    return max(1, math.ceil(epochs * rows / (batch_size * grad_accum)))


def check_vocab(model: GPT, tokenizer: Any, where: str) -> None:
    """ValueError unless every id the tokenizer can produce is a row of the model's embedding."""
    if tokenizer.vocab_size > model.config.vocab_size:
        kind = "the byte tokenizer" if isinstance(tokenizer, ByteTokenizer) else "the tokenizer"
        raise ValueError(f"{kind} has {tokenizer.vocab_size} tokens but the model in {where} has vocab_size "
                         f"{model.config.vocab_size}; give the tokenizer the model was trained with (--tokenizer)")


def resolve_max_length(block_size: int, virtual_tokens: int, max_length: int | None) -> int:
    """The longest row: block_size less the virtual tokens of a prefix / prompt method (they take positions),
    or `max_length` if given and within that."""
    room = block_size - virtual_tokens
    if room < 2:
        raise ValueError(f"num_virtual_tokens={virtual_tokens} leaves {room} positions of the model's block_size "
                         f"{block_size}; use fewer virtual tokens")
    if max_length is None:
        return room
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= room:
        raise ValueError(f"max_length must be an int in 2…{room} (block_size {block_size} less {virtual_tokens} "
                         f"virtual tokens), got {max_length!r}")
    return max_length


def copy_tokenizer_files(source: str | Path, target: str | Path) -> list[str]:
    """Copy the tokenizer files of a transformers checkpoint (TOKENIZER_FILES that exist) atomically."""
    copied = []
    for name in TOKENIZER_FILES:
        path = Path(source) / name
        if path.is_file():
            atomic_write(Path(target) / name, lambda tmp, path=path: shutil.copyfile(path, tmp))
            copied.append(name)
    return copied


def save_whole_model(model: GPT, base: str | Path, out: str | Path) -> None:
    """A whole GPT-2 in `out` that works alone: config.json + model.safetensors (`GPT.save_pretrained`), the
    base's tokenizer files, and the base's special-token ids (bos/eos/pad, into config.json) and
    generation_config.json, which GPT does not store: transformers would fall back to GPT-2's 50256, out of
    range for another vocabulary."""
    base, out = Path(base), Path(out)
    model.save_pretrained(out)
    base_config = json.loads((base / "config.json").read_text())
    ids = {k: base_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in base_config}
    if ids:
        config = json.loads((out / "config.json").read_text())
        save_json({**config, **ids}, out / "config.json")
    generation = base / "generation_config.json"
    if generation.is_file():
        save_json(json.loads(generation.read_text()), out / "generation_config.json")
    copy_tokenizer_files(base, out)


def _check_run_dir(out: Path, resume: bool, base: Path, inputs: dict[str, str | Path | None]) -> None:
    """`out` can hold this run without replacing what the run reads: it is not the base's directory (a full
    fine-tune would overwrite the base's weights; any run would leave its run.json there), and no input file
    (`inputs`: label → path) lies in it under the name of a file the run writes (OUTPUT_FILES)."""
    check_output_dir(out, label="out")
    if out.resolve() == base.resolve():  # as minipeft.merge refuses it
        raise ValueError(f"out {str(out)!r} is the base directory; write the fine-tuned result elsewhere")
    for label, path in inputs.items():
        written = {(out / name).resolve(): name for name in OUTPUT_FILES}  # resolved: a link into out counts too
        if path is not None and Path(path).resolve() in written:
            raise ValueError(f"{label} {str(path)!r} is out's {written[Path(path).resolve()]} (in {str(out)!r}), "
                             "which the run writes; move the file or choose another output directory")
    committed = latest_checkpoint(out)
    if resume and committed is None:
        raise ValueError(f"resume: there is no checkpoint in {str(out)!r} (no checkpoints/latest.json); a run writes "
                         "one every save_every steps")
    if not resume and committed is not None:
        raise ValueError(f"{str(out)!r} already holds a training run (checkpoints/latest.json); continue it with "
                         "resume (--resume), or choose another output directory")


def finetune_jsonl(
    base: str | Path,
    data: str | Path,
    out: str | Path,
    method: str = "lora",
    *,
    eval_data: str | Path | None = None,
    tokenizer: str | Path | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    options: MethodOptions | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    lr: float | None = None,
    batch_size: int = 8,
    grad_accum: int = 1,
    max_length: int | None = None,
    warmup_steps: int | None = None,
    eval_every: int = 0,
    save_every: int | None = None,
    resume: bool = False,
    format: str = "minipeft",
    seed: int = 0,
    device: str = "auto",
    fsdp: bool = False,
    compile: bool | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune `method` on the base GPT-2 in `base` with the JSONL file `data`; write the result to `out`.

    Args:
        base: a local GPT-2 directory (config.json + safetensors), e.g. saved by transformers.
        data, eval_data: JSONL files (minipeft/jsonl.py); eval_data must have the same format (and, for
            classification, only labels seen in `data`). Evaluated every `eval_every` steps and at the end.
        tokenizer: a tokenizer.json; default `base`/tokenizer.json when it exists, else the byte tokenizer.
        eos_token_id, pad_token_id: override the tokenizer's (see minipeft.tokenizer.load_tokenizer_json).
        options: the method's knobs (`MethodOptions`); None (or None fields) keeps minipeft.methods' defaults.
        steps / epochs: how long (one of them; default one epoch); epochs → steps_for_epochs.
        lr: default the method's rate in minipeft.methods.METHODS (tuned on the built-in base).
        batch_size, grad_accum: rows per micro-batch (the global batch under torchrun), micro-batches per step.
        max_length: the longest row in tokens; default the model's block_size less any virtual tokens.
        warmup_steps: default 10% of the steps, between 1 and 100.
        save_every: a training checkpoint every N steps (0: none; default 100, or none with fsdp, whose sharded
            state the checkpoints do not cover); resume: continue `out`'s last checkpoint, given the same arguments.
        format: "minipeft" or "peft" (files HF peft loads; refused before training for bottleneck adapters
            and full fine-tuning, which HF peft has no adapter format for).

    Returns a record (on every rank): method, steps, lr, final_loss, eval (the last evaluation's metrics or
    None), tokens_per_second, trainable_parameters, world_size, out.

    Raises:
        ValueError: a bad argument (before anything is trained), among them an `out` that is the base's
            directory or holds an input file under the name of one the run writes; and
            minipeft.train.TrainingDivergedError (a ValueError) when the loss stops being finite: the adapter
            (or model) and run.json are then not written, and those of an earlier run in `out` stay; its
            metrics.jsonl does not (a run starts its log afresh), so `out` then holds the diverged run's log.
    """
    out, base = Path(out), Path(base)
    options = MethodOptions() if options is None else options
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    if steps is not None and epochs is not None:
        raise ValueError(f"give steps or epochs, not both (got steps={steps}, epochs={epochs})")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, float))
                               or not math.isfinite(epochs) or epochs <= 0):
        raise ValueError(f"epochs must be a finite number > 0, got {epochs!r}")
    for name, value in (("batch_size", batch_size), ("grad_accum", grad_accum)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    dev = resolve_device(device)
    _check_run_dir(out, resume, base, {"data": data, "eval_data": eval_data, "tokenizer": tokenizer})
    tok = load_tokenizer(base, tokenizer, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    config = method_config(method, options, tok)
    if config is None and format != "minipeft":
        raise ValueError(f"format {format!r}: full fine-tuning writes a whole GPT-2 checkpoint (transformers loads "
                         "it as it is); the peft format is for adapters")
    if config is not None:
        check_format(config, format)  # before anything is trained: a bottleneck adapter has no peft format
    rank, world, dev = init_distributed(dev)
    if fsdp and world == 1:
        raise ValueError("fsdp=True needs several processes: run under `torchrun --nproc_per_node N`")
    gpt = GPT.from_pretrained(base)
    check_vocab(gpt, tok, str(base))
    max_length = resolve_max_length(gpt.config.block_size, getattr(config, "num_virtual_tokens", 0), max_length)
    train_ds = load_jsonl(data, tok, max_length)
    eval_ds = None
    if eval_data is not None:
        labels = train_ds.labels if train_ds.format == "classification" else None
        eval_ds = load_jsonl(eval_data, tok, max_length, labels=labels, format=train_ds.format)
    if save_every is None:
        save_every = 0 if fsdp else 100
    if steps is None:
        steps = steps_for_epochs(1.0 if epochs is None else epochs, len(train_ds), batch_size, grad_accum)
    cfg = TrainConfig(steps=steps, lr=METHODS[method].lr if lr is None else lr, batch_size=batch_size,
                      grad_accum=grad_accum, seed=seed, eval_every=eval_every, compile=compile,
                      warmup_steps=max(1, min(100, steps // 10)) if warmup_steps is None else warmup_steps)

    torch.manual_seed(seed)  # the adapter's initialisation
    model = apply_method(method, gpt, options, tok).to(dev)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("%s: %s trainable parameters of %s", method, f"{trainable:,}", f"{gpt.num_parameters():,}")
    if fsdp:
        shard_fsdp(model)
    eval_fn = (lambda m: evaluate_dataset(m, eval_ds, batch_size)) if eval_ds is not None else None
    result = train(model, train_ds.batches(batch_size, seed), cfg, eval_fn=eval_fn, loss_fn=dataset_loss(train_ds),
                   progress=progress, desc=f"{method} on {Path(data).name}", run_dir=out, save_every=save_every,
                   resume=resume)
    record = {"method": method, "out": str(out), "format": format, "steps": steps, "lr": cfg.lr,
              "final_loss": result.losses[-1], "eval": result.evals[-1][1] if result.evals else None,
              "tokens_per_second": result.tokens_per_second * world, "trainable_parameters": trainable,
              "world_size": world}
    state = full_state_dict(model, fsdp)  # a collective under FSDP: every rank takes part
    if rank == 0:
        if fsdp:  # save from a plain 1-process copy: the gathered weights, complete
            model = apply_method(method, GPT.from_pretrained(base), options, tok)
            model.load_state_dict(state)
        _save_result(model, config, out, base, format)
        data_record = {"format": train_ds.format, "labels": list(train_ds.labels), "max_length": max_length,
                       "train": train_ds.summary(), "eval": eval_ds.summary() if eval_ds else None}
        results = ("final_loss", "eval", "tokens_per_second", "trainable_parameters", "world_size")
        save_json({"method": method, "options": dataclasses.asdict(options), "base": str(base.resolve()),
                   "tokenizer": _tokenizer_source(base, tokenizer, tok), "format": format, "data": data_record,
                   "train_config": dataclasses.asdict(cfg), "result": {k: record[k] for k in results}},
                  out / RUN_NAME)
    if world > 1:
        dist.barrier()
    return record


def _tokenizer_source(base: Path, tokenizer: str | Path | None, tok: Any) -> str:
    if isinstance(tok, ByteTokenizer):
        return "byte"
    return str(Path(tokenizer).resolve()) if tokenizer is not None else str((base / "tokenizer.json").resolve())


def _save_result(model: torch.nn.Module, config: Any, out: Path, base: Path, format: str) -> None:
    """An adapter in `format`, or (full fine-tuning) the whole GPT-2 with the base's tokenizer files."""
    if config is None:
        save_whole_model(model, base, out)
        return
    peft_base = str(base.resolve()) if format == "peft" else None
    model.save_adapter(out, "default", format=format, base_model_name_or_path=peft_base)


def read_run(directory: str | Path) -> dict[str, Any]:
    """The run.json that `finetune_jsonl` wrote in `directory`, or {} when there is none."""
    path = Path(directory) / RUN_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path} is not JSON: {e}") from e


def load_finetuned(base: str | Path, adapter: str | Path | None = None, tokenizer: str | Path | None = None, *,
                   eos_token_id: int | None = None, pad_token_id: int | None = None, device: str = "auto",
                   ) -> tuple[torch.nn.Module, HFTokenizer | ByteTokenizer, dict[str, Any]]:
    """(model in eval mode, tokenizer, run.json's contents or {}) for the base in `base` with the adapter in
    `adapter` (either format) loaded and active; a QLoRA adapter gets the NF4 base it was trained on."""
    base = Path(base)
    tok = load_tokenizer(base, tokenizer, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    model = GPT.from_pretrained(base)
    check_vocab(model, tok, str(base))
    run: dict[str, Any] = {}
    if adapter is not None:
        adapter = Path(adapter)
        if (adapter / "config.json").is_file() and not (adapter / WEIGHTS_NAME).is_file():
            raise ValueError(f"{str(adapter)!r} holds a whole model (full fine-tuning), not an adapter: pass it as "
                             "the base instead")
        run = read_run(adapter)
        if run.get("method") == "qlora":
            model = quantize_model(model, target_modules="all-linear", blocksize=64, double_quant=True)
        elif run.get("method") == "lora8":
            model = quantize_model(model, target_modules="all-linear", bits=8)
        model = PeftModel.from_pretrained(model, adapter)
    else:
        run = read_run(base)  # a fully fine-tuned model carries its run.json
    return model.to(resolve_device(device)).eval(), tok, run


def load_eval_data(path: str | Path, tokenizer: Any, model: torch.nn.Module, run: dict[str, Any],
                   max_length: int | None = None) -> JsonlDataset:
    """A JSONL file for evaluating `model`: with the training run's labels and format when run.json has them,
    and its max_length (or the model's room) unless given."""
    saved = run.get("data") or {}
    if max_length is None and saved.get("max_length"):
        max_length = saved["max_length"]
    max_length = resolve_max_length(model.config.block_size, getattr(model, "num_virtual_tokens", 0), max_length)
    if saved.get("format") == "classification":
        return load_jsonl(path, tokenizer, max_length, labels=saved["labels"], format="classification")
    return load_jsonl(path, tokenizer, max_length)
