"""One helper for every "this method learns a task" test: fine-tune with the real training loop, then score.

Classification tasks are trained on the verbalizer token only (`task_batch` does that for accuracy tasks),
which is exactly the logit `evaluate` reads.
"""

from __future__ import annotations

from minipeft import kernels
from minipeft.data import load_task, task_batch, task_loss
from minipeft.evaluate import evaluate
from minipeft.train import TrainConfig, train


def learn_task(model, tokenizer, task_name: str, steps: int, lr: float, batch_size: int = 16,
               seed: int = 0) -> tuple[float, float]:
    """Train `model`'s trainable parameters on the task, return (chance, test metric).

    The reference kernel backend is pinned: the Triton interpreter (which "auto" would pick on a CPU with
    TRITON_INTERPRET=1) is for checking kernels, not for training loops."""
    task = load_task(task_name)
    with kernels.use_backend("reference"):
        train(model, lambda g: task_batch(task, tokenizer, batch_size, model.config.block_size, g),
              TrainConfig(steps=steps, lr=lr, batch_size=batch_size, warmup_steps=10, seed=seed),
              loss_fn=task_loss(task, tokenizer), progress=False)
        return task.chance, evaluate(model, task, tokenizer, "test")


def halfway(chance: float) -> float:
    """The bar every method must clear: halfway from chance to perfect."""
    return chance + (1 - chance) / 2
