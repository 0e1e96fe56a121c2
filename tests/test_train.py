"""The training loop: schedule, loss goes down, reproducibility, checkpoints, frozen parameters stay put."""

from __future__ import annotations

import math

import pytest
import torch

from minipeft.data import load_task, task_batch
from minipeft.model import GPT, GPTConfig
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import TrainConfig, lr_at, train


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=96, n_layer=2, n_head=2, n_embd=32))


def sentiment_batches(batch_size: int = 8):
    tok, task = ByteTokenizer(), load_task("sentiment")
    return lambda g: task_batch(task, tok, batch_size, 96, g)


def test_lr_schedule_is_warmup_then_cosine():
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_short_training_lowers_the_loss():
    result = train(tiny_gpt(), sentiment_batches(), TrainConfig(steps=40, lr=3e-3, warmup_steps=4),
                   progress=False)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert result.tokens > 0 and result.tokens_per_second > 0


def test_training_is_reproducible_from_the_seed():
    cfg = TrainConfig(steps=8, lr=3e-3, warmup_steps=2, seed=5)
    a = train(tiny_gpt(), sentiment_batches(), cfg, progress=False)
    b = train(tiny_gpt(), sentiment_batches(), cfg, progress=False)
    assert a.losses == b.losses


def test_only_trainable_parameters_change():
    model = tiny_gpt()
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("transformer.h.1.mlp")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train(model, sentiment_batches(), TrainConfig(steps=3, warmup_steps=1), progress=False)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_checkpoint_is_written_and_reloads(tmp_path):
    model = tiny_gpt()
    train(model, sentiment_batches(), TrainConfig(steps=2, warmup_steps=1), checkpoint_dir=tmp_path,
          progress=False)
    again = GPT.from_pretrained(tmp_path)
    idx = torch.randint(0, 256, (1, 12))
    assert torch.equal(again(idx)[0], model(idx)[0])
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries


def test_eval_fn_is_called_every_n_steps_and_at_the_end():
    seen = []
    result = train(tiny_gpt(), sentiment_batches(), TrainConfig(steps=5, warmup_steps=1, eval_every=2),
                   eval_fn=lambda m: seen.append(m.training) or {"acc": 0.5}, progress=False)
    assert [s for s, _ in result.evals] == [2, 4, 5]
    assert seen == [False, False, False]  # evaluation runs in eval mode


def test_fully_frozen_model_is_a_clear_error():
    model = tiny_gpt().requires_grad_(False)
    with pytest.raises(ValueError, match="require grad"):
        train(model, sentiment_batches(), TrainConfig(steps=1), progress=False)


@pytest.mark.parametrize("bad", [dict(steps=0), dict(lr=0.0), dict(batch_size=0)])
def test_bad_train_config(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig(**bad)
