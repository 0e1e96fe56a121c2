"""Scoring: every task and split runs, with and without the hand-written prompt, for a GPT and a PeftModel."""

from __future__ import annotations

import pytest

from minipeft.data import TASKS, load_task
from minipeft.evaluate import evaluate, predict
from minipeft.tuners import PromptTuningConfig, get_peft_model


@pytest.mark.parametrize("name", TASKS)
def test_every_task_scores_with_and_without_the_discrete_prompt(tiny_model, tokenizer, name):
    task = load_task(name)
    for split in ("validation", "test"):
        for prefix in ("", task.discrete_prompt):
            score = evaluate(tiny_model, task, tokenizer, split, max_examples=3, prefix=prefix)
            assert 0.0 <= score <= 1.0


def test_generation_is_capped_by_the_context_left_after_virtual_tokens(tiny_model, tokenizer):
    task = load_task("record")
    n = tiny_model.config.block_size - 70  # leaves fewer positions than task.max_new_tokens for some prompts
    pm = get_peft_model(tiny_model, PromptTuningConfig(num_virtual_tokens=n))
    assert pm.num_virtual_tokens == n
    preds = predict(pm, task, tokenizer, task.test[:4])
    assert len(preds) == 4


def test_classification_predicts_one_of_the_choices(tiny_model, tokenizer):
    task = load_task("sentiment")
    assert set(predict(tiny_model, task, tokenizer, task.test[:8])) <= set(task.choices)


def test_evaluate_puts_the_mode_back_when_it_fails(tiny_model, tokenizer, monkeypatch):
    import minipeft.evaluate as ev

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(ev, "predict", broken)
    tiny_model.train()
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate(tiny_model, load_task("sentiment"), tokenizer, max_examples=2)
    assert tiny_model.training
