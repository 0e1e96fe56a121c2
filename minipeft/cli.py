"""The `minipeft` command: pretrain the base model, generate text, fine-tune, compare methods.

Every sub-command validates its arguments and reports a bad one as a one-line error with exit code 2
(argparse's convention), never a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from minipeft import compare
from minipeft.data import TASKS
from minipeft.finetune import finetune
from minipeft.methods import METHODS
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
    model = load_base(args.preset, args.seed, device=str(device))
    tok = ByteTokenizer()
    idx = torch.tensor([tok.encode(args.prompt, add_bos=True)], device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(idx, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                         temperature=args.temperature, top_k=args.top_k, eos_token_id=tok.eos_token_id,
                         generator=gen)
    print(tok.decode(out[0].tolist()))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    record = finetune(args.method, args.task, args.steps, args.lr, args.preset, args.seed, args.device, args.out,
                      args.batch_size, args.fsdp, compile=args.compile)
    if record["metric"] is not None:  # rank 0
        print(f"{args.method} on {args.task}: test metric {record['metric']:.3f}, "
              f"final loss {record['final_loss']:.3f}, "
              f"{record['tokens_per_second']:,.0f} tok/s on {record['world_size']} process(es)"
              + (f"; saved to {args.out}" if args.out else ""))
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

    p = sub.add_parser("generate", help="continue a prompt with the cached base model")
    common(p)
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=_positive_int, default=60)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=_positive_float, default=1.0)
    p.add_argument("--top-k", type=_positive_int, default=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("finetune", help="fine-tune one method on one task (runs under torchrun for DDP / FSDP)")
    common(p)
    p.add_argument("--method", required=True, choices=list(METHODS))
    p.add_argument("--task", default="sentiment", choices=list(TASKS))
    p.add_argument("--steps", type=_positive_int, default=150)
    p.add_argument("--lr", type=_positive_float, default=None, help="default: the method's rate in minipeft.methods")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="the global batch, split across ranks")
    p.add_argument("--out", default=None, help="write the adapter (or, for full, the model) here")
    p.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (under torchrun)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (default: on with CUDA, off on the CPU)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("compare", help="fine-tune every method on a task and print the measured comparison table")
    compare.add_arguments(p)
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"minipeft {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
