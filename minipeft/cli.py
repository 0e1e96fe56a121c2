"""The `minipeft` command: pretrain the base model, generate text, fine-tune, compare methods, merge, evaluate.

Two kinds of run share the commands. The built-in ones (`--preset`, `--task`) use the cached base model and
the built-in tasks, as the README and the course do. A user's own (`--base DIR`, `--data FILE.jsonl`) use a
local GPT-2 checkpoint and JSONL files (minipeft/finetune_jsonl.py); the two groups of flags are mutually
exclusive, and mixing them is a usage error that names both.

    minipeft finetune --base DIR --data TRAIN.jsonl [--eval-data VAL.jsonl] --method M --out OUT [--format peft]
    minipeft generate --base DIR [--adapter OUT] "prompt"
    minipeft merge    --base DIR --adapter OUT --out MERGED        (LoRA: a GPT-2 checkpoint transformers loads)
    minipeft evaluate --base DIR [--adapter OUT] --data VAL.jsonl   (loss, perplexity, accuracy)

Every sub-command validates its arguments and reports a bad one as a one-line error with exit code 2
(argparse's convention), never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import torch

from minipeft import compare
from minipeft.data import TASKS
from minipeft.evaluate import evaluate_dataset
from minipeft.finetune import finetune
from minipeft.finetune_jsonl import finetune_jsonl, load_eval_data, load_finetuned
from minipeft.merge import merge_adapter
from minipeft.methods import METHODS, MethodOptions
from minipeft.pretrain import base_dir, load_base, pretrain_and_cache, pretrain_record
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import resolve_device


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate, a temperature): NaN, inf, 0 and negatives are usage errors."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _target_modules(text: str) -> str | list[str]:
    """"all-linear", or comma-separated module names / suffixes ("c_attn,c_proj")."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected module names separated by commas, or all-linear; got {text!r}")
    return names[0] if names == ["all-linear"] else names


def _real(text: str) -> float:
    """A finite number (LoRA's alpha may be negative, as in peft; 0 is refused by LoraConfig)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def cmd_pretrain(args: argparse.Namespace) -> int:
    record = pretrain_record(args.preset, args.seed)
    if record is None or args.force or args.steps:
        record = pretrain_and_cache(args.preset, args.seed, args.device, args.steps)
        verb = "pretrained"
    else:
        verb = "already cached"
    print(f"base model {args.preset!r} {verb} at {base_dir(args.preset, args.seed)}")
    print(f"  {record['parameters']:,} parameters, {record['steps']} steps, loss {record['first_loss']:.2f} -> "
          f"{record['final_loss']:.3f} in {record['seconds']:.0f} s ({record['tokens_per_second']:,.0f} tok/s)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    if args.base is not None:  # the user's own model
        model, tok, _ = load_finetuned(args.base, args.adapter, args.tokenizer, eos_token_id=args.eos_token_id,
                                       pad_token_id=args.pad_token_id, device=str(device))
    else:
        model, tok = load_base(args.preset or "default", args.seed, device=str(device)), ByteTokenizer()
    ids = tok.encode(args.prompt, add_bos=True)
    room = model.config.block_size - len(ids) - getattr(model, "num_virtual_tokens", 0)
    if room <= 0:
        raise ValueError(f"the prompt is {len(ids)} tokens, which leaves no room to generate in the model's "
                         f"block_size {model.config.block_size}")
    if args.max_new_tokens > room:  # said, not silently cut
        print(f"minipeft generate: --max-new-tokens {args.max_new_tokens} cut to {room}: the {len(ids)}-token prompt "
              f"leaves {room} of the model's block_size {model.config.block_size}", file=sys.stderr)
    idx = torch.tensor([ids], device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    temperature = 1.0 if args.temperature is None else args.temperature
    out = model.generate(idx, max_new_tokens=min(args.max_new_tokens, room), do_sample=args.sample,
                         temperature=temperature, top_k=args.top_k, eos_token_id=tok.eos_token_id,
                         generator=gen)
    print(tok.decode(out[0].tolist()))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    if args.base is not None:
        return _finetune_own(args)
    task = args.task or "sentiment"
    record = finetune(args.method, task, args.steps or 150, args.lr, args.preset or "default", args.seed,
                      args.device, args.out, args.batch_size or 16, args.fsdp, compile=args.compile)
    if record["metric"] is not None:  # rank 0
        print(f"{args.method} on {task}: test metric {record['metric']:.3f}, "
              f"final loss {record['final_loss']:.3f}, "
              f"{record['tokens_per_second']:,.0f} tok/s on {record['world_size']} process(es)"
              + (f"; saved to {args.out}" if args.out else ""))
    return 0


def _metrics_text(metrics: dict[str, float]) -> str:
    shown = [f"loss {metrics['loss']:.4f}", f"perplexity {metrics['perplexity']:.3f}"]
    if "accuracy" in metrics:
        shown.append(f"accuracy {metrics['accuracy']:.3f}")
    return ", ".join(shown)


def _finetune_own(args: argparse.Namespace) -> int:
    options = MethodOptions(r=args.r, alpha=args.alpha, target_modules=args.target_modules,
                            num_virtual_tokens=args.num_virtual_tokens, init_text=args.init_text,
                            reduction_factor=args.reduction_factor)
    record = finetune_jsonl(
        args.base, args.data, args.out, args.method, eval_data=args.eval_data, tokenizer=args.tokenizer,
        eos_token_id=args.eos_token_id, pad_token_id=args.pad_token_id, options=options, steps=args.steps,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size or 8, grad_accum=args.grad_accum or 1,
        max_length=args.max_length, warmup_steps=args.warmup_steps, eval_every=args.eval_every or 0,
        save_every=args.save_every, resume=args.resume,
        format=args.format or "minipeft", seed=args.seed, device=args.device, fsdp=args.fsdp, compile=args.compile)
    if _rank() == 0:
        evaluation = f"; eval {_metrics_text(record['eval'])}" if record["eval"] else ""
        print(f"{args.method} on {Path(args.data).name}: {record['steps']} steps, final loss "
              f"{record['final_loss']:.4f}{evaluation}; {record['tokens_per_second']:,.0f} tok/s; wrote {args.out} "
              f"({record['format']} format; metrics.jsonl, loss.png, run.json)")
    return 0


def _rank() -> int:
    """This process's rank under torchrun (0 when alone): only rank 0 prints the result."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def cmd_merge(args: argparse.Namespace) -> int:
    out = merge_adapter(args.base, args.adapter, args.out)
    print(f"merged {args.adapter} with {args.base} (left as it was): wrote {out} (config.json, model.safetensors "
          "and the base's tokenizer files; transformers' GPT2LMHeadModel.from_pretrained loads it)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    model, tok, run = load_finetuned(args.base, args.adapter, args.tokenizer, eos_token_id=args.eos_token_id,
                                     pad_token_id=args.pad_token_id, device=args.device)
    data = load_eval_data(args.data, tok, model, run, args.max_length)
    metrics = evaluate_dataset(model, data, args.batch_size)
    print(f"{args.data}: {len(data):,} rows ({data.format}): {_metrics_text(metrics)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    compare.validate(args)
    rows = compare.compare(args)
    full = rows[0]["full_checkpoint_bytes"]
    print(f"\ntask {args.task!r}, {args.steps} steps per method; metric: {rows[0]['metric_name']} on the test split "
          f"(chance {rows[0]['chance']:.3f}); full checkpoint {compare._fmt_bytes(full)}")
    print(compare.format_table(rows))
    print(f"\nwrote {args.out}/results.json, results.csv and results.png")
    return 0


# Flags of a user's own run (--base/--data) and of the built-in one (--preset/--task): never both.
OWN_FLAGS = ("base", "data", "eval_data", "tokenizer", "adapter", "epochs", "grad_accum", "max_length", "r", "alpha",
             "target_modules", "num_virtual_tokens", "init_text", "reduction_factor", "format", "save_every",
             "resume", "eval_every", "warmup_steps", "eos_token_id", "pad_token_id")
BUILTIN_FLAGS = ("preset", "task")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _given(args: argparse.Namespace, dests: tuple[str, ...]) -> list[str]:
    """The flags among `dests` that the command line set (argparse defaults here are None or False)."""
    return [_flag(d) for d in dests if getattr(args, d, None) not in (None, False)]


def _check_groups(parser: argparse.ArgumentParser, args: argparse.Namespace, required: tuple[str, ...]) -> None:
    """--preset/--task and --base/--data... are alternatives; a run of one's own needs `required` too."""
    own, builtin = _given(args, OWN_FLAGS), _given(args, BUILTIN_FLAGS)
    if own and builtin:
        parser.error(f"{builtin[0]} (the built-in base and tasks) and {own[0]} (your own model and data) cannot be "
                     "combined: use --preset/--task, or --base/--data")
    if own:
        missing = [_flag(d) for d in required if getattr(args, d, None) is None]
        if missing:
            parser.error(f"{own[0]} (your own model) also needs {', '.join(missing)}")
    if getattr(args, "adapter", None) is not None and getattr(args, "base", None) is None:
        parser.error("--adapter needs --base (the model the adapter was trained on)")


def _own_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("your own model (instead of --preset)")
    g.add_argument("--base", default=None, metavar="DIR", help="a local GPT-2 checkpoint (config.json + safetensors)")
    g.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="a tokenizer.json (default: DIR/tokenizer.json if it exists, else the byte tokenizer)")
    g.add_argument("--eos-token-id", type=_non_negative_int, default=None, help="override the tokenizer's EOS id")
    g.add_argument("--pad-token-id", type=_non_negative_int, default=None,
                   help="override the tokenizer's PAD id (default EOS)")


def _finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune one method on a built-in task, or on your own model and JSONL "
                                        "(runs under torchrun for DDP / FSDP)")
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps (built-in default 150; "
                   "with --data, default one epoch)")
    p.add_argument("--lr", type=_positive_float, default=None, help="default: the method's rate in minipeft.methods")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="the global batch, split across ranks (default 16 built-in, 8 with --data)")
    p.add_argument("--out", default=None, help="write the adapter (or, for full, the model) here")
    p.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (under torchrun)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (default: on with CUDA, off on the CPU)")
    g = p.add_argument_group("built-in base and task (instead of --base/--data)")
    g.add_argument("--preset", default=None, choices=["default", "tiny"], help="base model preset (default: default)")
    g.add_argument("--task", default=None, choices=list(TASKS), help="built-in task (default: sentiment)")
    _own_model_arguments(p)
    g = p.add_argument_group("your own data")
    g.add_argument("--data", default=None, metavar="TRAIN.jsonl",
                   help='rows {"text"} | {"prompt", "completion"} | {"text", "label"}')
    g.add_argument("--eval-data", default=None, metavar="VAL.jsonl", help="evaluated every --eval-every steps and "
                   "at the end")
    g.add_argument("--epochs", type=_positive_float, default=None, help="passes over the data (instead of --steps)")
    g.add_argument("--grad-accum", type=_positive_int, default=None, help="micro-batches per step (default 1)")
    g.add_argument("--max-length", type=_positive_int, default=None,
                   help="longest row in tokens; longer rows are truncated (default: block_size less virtual tokens)")
    g.add_argument("--warmup-steps", type=_non_negative_int, default=None, help="default 10%% of the steps, ≤ 100")
    g.add_argument("--eval-every", type=_non_negative_int, default=None, help="default: at the end only")
    g.add_argument("--save-every", type=_non_negative_int, default=None,
                   help="a training checkpoint in OUT/checkpoints every N steps (default 100; none with --fsdp)")
    g.add_argument("--resume", action="store_true", help="continue OUT's last checkpoint (same arguments)")
    g.add_argument("--format", default=None, choices=["minipeft", "peft"],
                   help="adapter files: minipeft's, or HF peft's (PeftModel.from_pretrained loads them)")
    g = p.add_argument_group("method options (default: minipeft.methods' choices)")
    g.add_argument("--r", type=_positive_int, default=None, help="LoRA rank (lora, qlora, lora8; default 8)")
    g.add_argument("--alpha", type=_real, default=None, help="LoRA alpha (default 16)")
    g.add_argument("--target-modules", type=_target_modules, default=None,
                   help="LoRA targets: comma-separated names, or all-linear (the default)")
    g.add_argument("--num-virtual-tokens", type=_positive_int, default=None,
                   help="prefix (default 10), prompt and ptuning (default 20)")
    g.add_argument("--init-text", default=None, help="prompt tuning: start from this text's embeddings")
    g.add_argument("--reduction-factor", type=_positive_int, default=None,
                   help="bottleneck adapters (pfeiffer, houlsby; default 16)")
    p.set_defaults(func=cmd_finetune, check=lambda args, p=p: _check_finetune(p, args))


def _check_finetune(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    _check_groups(parser, args, ("base", "data", "out"))
    if args.steps is not None and args.epochs is not None:
        parser.error(f"--steps {args.steps} and --epochs {args.epochs:g}: give one of them")


def _check_generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    _check_groups(parser, args, ("base",))
    if not args.sample and (args.temperature is not None or args.top_k is not None):
        given = [f for f, v in (("--temperature", args.temperature), ("--top-k", args.top_k)) if v is not None]
        parser.error(f"{' and '.join(given)} shape sampling and need --sample (without it, decoding is greedy)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minipeft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", default="default", choices=["default", "tiny"], help="base model preset")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    p = sub.add_parser("pretrain", help="pretrain the base GPT on the built-in corpus and cache it")
    common(p)
    p.add_argument("--steps", type=_positive_int, default=None, help="override the preset's step count")
    p.add_argument("--force", action="store_true", help="retrain even if a cached model exists")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("generate", help="continue a prompt with the cached base model, or with your own model "
                                        "(--base) and adapter (--adapter)")
    p.add_argument("prompt")
    p.add_argument("--preset", default=None, choices=["default", "tiny"], help="base model preset (default: default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    _own_model_arguments(p)
    p.add_argument("--adapter", default=None, metavar="OUT", help="an adapter directory (minipeft's or HF peft's)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=60)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=_positive_float, default=None, help="with --sample (default 1.0)")
    p.add_argument("--top-k", type=_positive_int, default=None, help="with --sample: keep the k likeliest tokens")
    p.set_defaults(func=cmd_generate, check=lambda args, p=p: _check_generate(p, args))

    _finetune_parser(sub)

    p = sub.add_parser("compare", help="fine-tune every method on a task and print the measured comparison table")
    compare.add_arguments(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("merge", help="merge a LoRA adapter into its base: a GPT-2 checkpoint transformers loads")
    p.add_argument("--base", required=True, metavar="DIR", help="the local GPT-2 checkpoint the adapter was trained on")
    p.add_argument("--adapter", required=True, metavar="OUT", help="the LoRA adapter directory")
    p.add_argument("--out", required=True, metavar="MERGED", help="where the merged checkpoint goes")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("evaluate", help="loss, perplexity (and accuracy) of your model on a JSONL file")
    _own_model_arguments(p)
    p.add_argument("--adapter", default=None, metavar="OUT", help="an adapter directory (minipeft's or HF peft's)")
    p.add_argument("--data", required=True, metavar="VAL.jsonl")
    p.add_argument("--max-length", type=_positive_int, default=None, help="default: the training run's")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=cmd_evaluate, check=lambda args, p=p: _check_groups(p, args, ("base",)))
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each message (it may be replaced after setup)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _show_progress_messages() -> None:
    """minipeft's INFO log lines (data summaries, parameter counts) on stderr; set up once per process."""
    log = logging.getLogger("minipeft")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "check"):
        args.check(args)
    _show_progress_messages()
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"minipeft {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
