"""How `minipeft compare` picked each method's learning rate: a small sweep on the validation split.

Every method is trained for the same step budget as `compare`'s default (150 steps of batch 16) at three
rates around its family's usual range and scored on the task's validation split (never the test split).
Prints one table; the best rate per method is what minipeft/methods.py's METHODS uses.

    python benchmarks/lr_sweep.py [--task sentiment] [--steps 150]
"""

from __future__ import annotations

import argparse
import copy
import time

from minipeft import kernels
from minipeft.data import load_task, task_batch, task_loss
from minipeft.evaluate import evaluate
from minipeft.methods import METHODS
from minipeft.pretrain import load_base
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import TrainConfig, train

GRID = {
    "full": (3e-4, 1e-3, 3e-3),
    "lora": (1e-3, 3e-3, 1e-2),
    "qlora": (1e-3, 3e-3, 1e-2),
    "pfeiffer": (3e-3, 1e-2, 3e-2),
    "houlsby": (3e-3, 1e-2, 3e-2),
    "prefix": (1e-2, 3e-2, 1e-1, 3e-1),  # the first world's best, 3e-2, was the top of (3e-3, 1e-2, 3e-2)
    "prompt": (1e-2, 3e-2, 1e-1),
    "ptuning": (3e-3, 1e-2, 3e-2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--methods", default=",".join(GRID))
    args = parser.parse_args()
    kernels.set_backend("reference")
    tok, task = ByteTokenizer(), load_task(args.task)
    base = load_base("default")
    rows = []
    for key in args.methods.split(","):
        scores = []
        for lr in GRID[key]:
            start = time.perf_counter()
            model = METHODS[key].build(copy.deepcopy(base), task, tok)
            cfg = TrainConfig(steps=args.steps, lr=lr, batch_size=16, warmup_steps=10)
            train(model, lambda g: task_batch(task, tok, 16, base.config.block_size, g), cfg,
                  loss_fn=task_loss(task, tok), progress=False)
            scores.append(evaluate(model, task, tok, "validation"))
            print(f"{key:>9} lr={lr:g}: validation {task.metric} {scores[-1]:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        best = max(range(len(scores)), key=lambda i: scores[i])
        rows.append((key, scores, GRID[key][best]))
    print(f"\ntask {args.task}, {args.steps} steps, validation {task.metric}")
    print(f"{'method':>9} | {'rates':>22} | {'scores':>22} | best")
    for key, scores, best in rows:
        rates = ", ".join(f"{r:g}" for r in GRID[key])
        print(f"{key:>9} | {rates:>22} | {', '.join(f'{s:.3f}' for s in scores):>22} | {best:g}")


if __name__ == "__main__":
    main()
