"""The built-in world and tasks: determinism, disjoint splits, and what is supervised."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerances import TOLERANCES

from minipeft.data import (
    TASKS,
    build_world,
    corpus_tokens,
    encode_examples,
    load_task,
    pretraining_batch,
    pretraining_corpus,
    task_loss,
    verbalizer_loss,
)
from minipeft.tokenizer import ByteTokenizer


def test_world_and_corpus_are_deterministic_in_the_seed():
    assert build_world(0) == build_world(0)
    assert build_world(0) != build_world(1)
    assert pretraining_corpus(build_world(0), 50, seed=0) == pretraining_corpus(build_world(0), 50, seed=0)
    assert pretraining_corpus(build_world(0), 50, seed=0) != pretraining_corpus(build_world(0), 50, seed=1)


@pytest.mark.parametrize("name", TASKS)
def test_tasks_are_deterministic_and_have_all_splits(name):
    a, b = load_task(name, seed=0), load_task(name, seed=0)
    assert a.train == b.train and a.test == b.test
    assert a.train and a.validation and a.test
    assert 0.0 <= a.chance < 1.0
    assert a.metric in ("accuracy", "exact_match")


def test_facts_test_people_never_appear_in_training_questions():
    task = load_task("facts")
    test_people = set(task.extra["test_people"])
    assert test_people
    assert not any(name in ex.prompt for ex in task.train for name in test_people)
    # ... but the corpus states their facts, so a pretrained model can know the answers
    corpus = " ".join(pretraining_corpus(build_world(0), 2000))
    assert all(name in corpus for name in test_people)


def test_task_formats_never_occur_in_the_corpus():
    corpus = " ".join(pretraining_corpus(build_world(0), 2000))
    for marker in ("Review:", "Record:", "Question:", "Sentiment:"):
        assert marker not in corpus


def test_sentiment_is_balanced_and_uses_the_verbalizer():
    task = load_task("sentiment")
    labels = [ex.answer for ex in task.train]
    assert set(labels) == {"good", "bad"}
    assert 0.4 < labels.count("good") / len(labels) < 0.6


def test_encode_examples_supervises_only_the_answer():
    tok = ByteTokenizer()
    task = load_task("record")
    idx, targets, mask = encode_examples(task.train[:4], tok, block_size=128)
    for i, ex in enumerate(task.train[:4]):
        answer = tok.encode(ex.answer, add_eos=True)
        supervised = targets[i][targets[i] != -100].tolist()
        assert supervised == answer
        n = len(tok.encode(ex.prompt, add_bos=True)) + len(answer)
        assert mask[i].sum() == n
        # targets are the next token: where supervised, targets[t] == idx[t + 1]
        t = (targets[i] != -100).nonzero().flatten()
        assert torch.equal(targets[i, t], idx[i, t + 1])
    with pytest.raises(ValueError, match="block_size"):
        encode_examples(task.train[:1], tok, block_size=8)


def test_pretraining_batch_targets_are_shifted_inputs():
    stream = corpus_tokens(pretraining_corpus(build_world(0), 20), ByteTokenizer())
    idx, targets = pretraining_batch(stream, 4, 16, torch.Generator().manual_seed(0))
    assert idx.shape == targets.shape == (4, 16)
    assert torch.equal(idx[:, 1:], targets[:, :-1])


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match="available"):
        load_task("translation")


def test_classification_supervises_only_the_verbalizer_token():
    tok = ByteTokenizer()
    task = load_task("sentiment")
    idx, targets, _ = encode_examples(task.train[:6], tok, 128, verbalizer_only=True)
    for i, ex in enumerate(task.train[:6]):
        assert targets[i][targets[i] != -100].tolist() == [tok.encode(ex.answer)[0]]


@pytest.mark.parametrize("name", TASKS)
def test_every_prompt_with_the_discrete_prompt_fits_the_default_context(name):
    """The prompt-engineering baseline prepends task.discrete_prompt: prompt + answer must fit in 128."""
    tok = ByteTokenizer()
    task = load_task(name)
    for ex in task.train + task.validation + task.test:
        n = len(tok.encode(task.discrete_prompt + ex.prompt, add_bos=True))
        assert n + len(tok.encode(ex.answer, add_eos=True)) <= 128, ex


def test_verbalizer_loss_is_cross_entropy_over_the_choice_logits_at_the_answer_position():
    tok = ByteTokenizer()
    task = load_task("sentiment")
    idx, targets, mask = encode_examples(task.train[:5], tok, 128, verbalizer_only=True)
    logits = torch.randn(*idx.shape, 260, generator=torch.Generator().manual_seed(0))
    net = lambda i, attention_mask=None: (logits, None)  # noqa: E731  a stand-in model: fixed logits
    choice_ids = [tok.encode(c)[0] for c in task.choices]  # "g", "b"
    expected = []
    for i, ex in enumerate(task.train[:5]):
        pos = (targets[i] != -100).nonzero().item()  # the one supervised position
        expected.append(F.cross_entropy(logits[i, pos, choice_ids], torch.tensor(task.choices.index(ex.answer))))
    loss = verbalizer_loss(choice_ids)(net, idx, targets, mask)
    # fp32 sums in another order; a mean of cross-entropies is positive, so a relative bound alone
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=TOLERANCES[torch.float32][0], atol=0)
    assert torch.equal(task_loss(task, tok)(net, idx, targets, mask), loss)  # what the task trains with
    assert task_loss(load_task("record"), tok) is None  # generation tasks: the model's own next-token loss
