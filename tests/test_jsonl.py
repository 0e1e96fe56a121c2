"""Your own data (minipeft/jsonl.py): the three row formats, what each supervises, truncation, epochs of batches,
the tokenizer.json loader's special ids, and a clear `file:line:` error for each kind of bad file."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from own_model import review_rows, train_bpe, write_jsonl
from tolerances import TOLERANCES, assert_close

from minipeft import kernels
from minipeft.data import dataset_loss, load_jsonl
from minipeft.evaluate import evaluate_dataset
from minipeft.model import GPT, GPTConfig
from minipeft.tokenizer import ByteTokenizer, load_tokenizer, load_tokenizer_json
from minipeft.train import TrainConfig, train
from minipeft.tuners import LoraConfig, get_peft_model

TOK = ByteTokenizer()  # one token per byte: every count below can be read off the strings
RTOL = TOLERANCES[torch.float32][0]  # fp32 losses summed in another order; positive, so a relative bound alone


@pytest.fixture(autouse=True)
def reference_kernels():
    with kernels.use_backend("reference"):
        yield


def supervised(ds, i: int) -> list[int]:
    return [t for t in ds.row_targets(i) if t != -100]


def test_each_format_is_detected_from_the_keys_and_supervises_its_own_tokens(tmp_path):
    text = load_jsonl(write_jsonl(tmp_path / "t.jsonl", [{"text": "abc"}]), TOK)
    assert text.format == "text" and text.row(0) == [TOK.bos_token_id, 97, 98, 99, TOK.eos_token_id]
    assert supervised(text, 0) == [97, 98, 99, TOK.eos_token_id]  # every token after BOS

    pc = load_jsonl(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q", "completion": "ab"}]), TOK)
    assert pc.format == "completion" and pc.row(0) == [TOK.bos_token_id, 81, 97, 98, TOK.eos_token_id]
    assert supervised(pc, 0) == [97, 98, TOK.eos_token_id]  # the completion and EOS only

    rows = [{"text": "x", "label": "yes"}, {"text": "yy", "label": "no"}, {"text": "z", "label": "yes"}]
    cls = load_jsonl(write_jsonl(tmp_path / "c.jsonl", rows), TOK)
    assert cls.format == "classification" and cls.labels == ("yes", "no") and cls.choice_ids == (121, 110)
    assert cls.row(1) == [TOK.bos_token_id, 121, 121, 110] and supervised(cls, 1) == [110]  # the label's first token

    idx, targets, mask = cls.batch([0, 1])
    assert idx.shape == targets.shape == mask.shape == (2, 4)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]] and idx[0, 3] == TOK.pad_token_id
    t = (targets != -100).nonzero()  # targets are shifted inputs wherever supervised
    assert torch.equal(targets[t[:, 0], t[:, 1]], idx[t[:, 0], t[:, 1] + 1])


def test_long_rows_are_truncated_counted_and_keep_what_is_supervised(tmp_path):
    rows = [{"prompt": "0123456789", "completion": "ab"}, {"prompt": "p", "completion": "c"}]
    ds = load_jsonl(write_jsonl(tmp_path / "pc.jsonl", rows), TOK, max_length=6)
    assert ds.n_truncated == 1 and ds.longest == 14
    assert ds.row(0) == [55, 56, 57, 97, 98, TOK.eos_token_id]  # "789" + "ab" + EOS: the prompt lost its start
    assert supervised(ds, 0) == [97, 98, TOK.eos_token_id] and ds.row(1) == [TOK.bos_token_id, 112, 99, 258]
    assert "1 rows (50.0%) were longer than max_length=6" in ds.summary()
    text = load_jsonl(write_jsonl(tmp_path / "t.jsonl", [{"text": "abcdefgh"}]), TOK, max_length=4)
    assert text.row(0) == [TOK.bos_token_id, 97, 98, 99]  # a text keeps its beginning
    long = load_jsonl(write_jsonl(tmp_path / "l.jsonl", [{"prompt": "p", "completion": "abcdefgh"}]), TOK,
                      max_length=4)
    assert long.row(0) == [112, 97, 98, 99] and supervised(long, 0) == [97, 98, 99]


def test_epoch_batches_visit_every_row_once_per_epoch_and_restart_from_their_state(tmp_path):
    ds = load_jsonl(write_jsonl(tmp_path / "t.jsonl", [{"text": str(i)} for i in range(10)]), TOK)
    batches = ds.batches(batch_size=4, seed=3)
    seen = [batches.indices(k) for k in range(5)]  # 20 positions: two epochs exactly
    flat = [i for b in seen for i in b]
    assert sorted(flat[:10]) == sorted(flat[10:]) == list(range(10)) and flat[:10] != flat[10:]
    for _ in range(3):
        batches()
    again = ds.batches(batch_size=4, seed=3)
    again.load_state_dict(batches.state_dict())
    assert torch.equal(again()[0], batches()[0])  # the same next batch, from the count alone
    assert ds.batches(4, seed=4).indices(0) != seen[0]


BAD_FILES = {
    # name: (lines of the file, what the error must say); {p} is the file
    "empty": ([], r"{p}:1: the file holds no rows"),
    "blank lines only": (["", "   "], r"{p}:1: the file holds no rows"),
    "not json": (['{"text": "a"}', '{"text": "b"'], r"{p}:2: not valid JSON"),
    "not an object": (['{"text": "a"}', '{"text": "b"}', '["text"]'], r"{p}:3: expected a JSON object"),
    "missing key": (['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'],
                    r"{p}:2: keys \['prompt'\], but line 1 has"),
    "unknown keys": (['{"txt": "a"}'], r"{p}:1: keys \['txt'\] match no format"),
    "extra key": (['{"text": "a", "label": "x", "id": 3}'], r"{p}:1: keys \['id', 'label', 'text'\] match no"),
    "mixed formats": (['{"text": "a"}', '', '{"text": "b", "label": "x"}'], r"{p}:3: keys .* line 1 has"),
    "not a string": (['{"text": "a", "label": "x"}', '{"text": "b", "label": 1}'], r"{p}:2: \"label\" must be a str"),
    "labels share a first token": (['{"text": "a", "label": "good"}', '{"text": "b", "label": "great"}'],
                                   r"{p}:2: labels 'good' and 'great' both start with token id 103"),
    "one label": (['{"text": "a", "label": "x"}', '{"text": "b", "label": "x"}'], r"{p}: every row has the label"),
    "empty label": (['{"text": "a", "label": ""}'], r"{p}:1: label '' has no tokens"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_file_names_its_line(tmp_path, case):
    lines, message = BAD_FILES[case]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    with pytest.raises(ValueError, match=message.format(p=str(path).replace("\\", "\\\\"))):
        load_jsonl(path, TOK)


def test_evaluation_data_must_match_the_training_labels_and_format(tmp_path):
    train = load_jsonl(write_jsonl(tmp_path / "train.jsonl", review_rows(8, bpe=False)), TOK)
    val = tmp_path / "val.jsonl"
    val.write_text('{"text": "a", "label": "good"}\n{"text": "b", "label": "meh"}\n')
    with pytest.raises(ValueError, match=rf"{val}:2: label 'meh' was never seen in training"):
        load_jsonl(val, TOK, labels=train.labels, format=train.format)
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match=rf"{other}:1: a text row .* but the training data is classification"):
        load_jsonl(other, TOK, labels=train.labels, format=train.format)
    undecodable = tmp_path / "latin1.jsonl"
    undecodable.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"{undecodable}:2: not UTF-8"):
        load_jsonl(undecodable, TOK)
    with pytest.raises(ValueError, match="does not exist"):
        load_jsonl(tmp_path / "missing.jsonl", TOK)
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        load_jsonl(val, TOK, max_length=1)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bpe")
    train_bpe(directory)
    return directory


def test_a_trained_bpe_tokenizer_json_gives_its_special_ids(bpe_dir, tmp_path):
    tok = load_tokenizer_json(bpe_dir)
    eot = tok._tok.token_to_id("<|endoftext|>")
    assert tok.eos_token_id == tok.pad_token_id == tok.bos_token_id == eot  # GPT-2's convention
    assert tok.decode(tok.encode("Zuvel lives in Velm.", add_bos=True)) == "Zuvel lives in Velm."
    assert load_tokenizer(bpe_dir).vocab_size == tok.vocab_size  # a model dir with tokenizer.json: BPE
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)  # none: the byte tokenizer
    given = load_tokenizer_json(bpe_dir, eos_token_id=5, pad_token_id=7)
    assert (given.eos_token_id, given.pad_token_id, given.bos_token_id) == (5, 7, 5)
    (tmp_path / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "a"}, "pad_token": "b"}))
    configured = load_tokenizer_json(tmp_path)
    assert configured.eos_token_id == configured._tok.token_to_id("a") != eot
    assert configured.pad_token_id == configured._tok.token_to_id("b")
    with pytest.raises(ValueError, match="eos_token_id must be a token id in 0…"):
        load_tokenizer_json(bpe_dir, eos_token_id=10**6)
    with pytest.raises(ValueError, match="apply to a tokenizer.json"):
        load_tokenizer(tmp_path / "nothing", eos_token_id=3)


def test_a_tokenizer_without_eos_asks_for_one(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="give eos_token_id"):
        load_tokenizer_json(tmp_path)
    assert load_tokenizer_json(tmp_path, eos_token_id=1).pad_token_id == 1


def test_evaluate_dataset_is_the_token_mean_over_the_whole_file(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64)).eval()
    ds = load_jsonl(write_jsonl(tmp_path / "t.jsonl", [{"text": "a" * n} for n in (3, 9, 5)]), TOK)
    nll, count = 0.0, 0
    for i in range(len(ds)):
        idx, targets, _ = ds.batch([i])
        logits, _ = model(idx)
        nll += F.cross_entropy(logits[0], targets[0], ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
    for batch_size in (1, 2):  # batch means would differ; the file's token mean does not
        got = evaluate_dataset(model, ds, batch_size)
        assert got["loss"] == pytest.approx(nll / count, rel=RTOL)
        assert got["perplexity"] == pytest.approx(torch.tensor(nll / count).exp().item(), rel=RTOL)

    cls = load_jsonl(write_jsonl(tmp_path / "c.jsonl", review_rows(6, bpe=False)), TOK)
    got = evaluate_dataset(model, cls, 4)
    idx, targets, mask = cls.batch(range(6))
    assert got["loss"] == pytest.approx(dataset_loss(cls)(model, idx, targets, mask).item(), rel=RTOL)
    assert 0 <= got["accuracy"] <= 1 and dataset_loss(ds) is None


def test_gradient_accumulation_takes_the_steps_of_the_larger_batch(tmp_path):
    """Two micro-batches of 4 and one batch of 8 give the same update when every row has as many supervised
    tokens (classification: one): the gradient of a mean of equal-sized means is the mean of all."""
    ds = load_jsonl(write_jsonl(tmp_path / "c.jsonl", review_rows(16, bpe=False)), TOK)
    trained = []
    for batch_size, grad_accum in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        pm = get_peft_model(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64)),
                            LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
        train(pm, ds.batches(batch_size), TrainConfig(steps=3, lr=1e-2, batch_size=batch_size, grad_accum=grad_accum,
                                                      warmup_steps=1), loss_fn=dataset_loss(ds), progress=False)
        trained.append(pm.adapter_state_dict("default"))
    for name, value in trained[0].items():
        assert_close(trained[1][name], value)
