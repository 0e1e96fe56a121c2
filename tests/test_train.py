"""The training loop: schedule, loss goes down, reproducibility, checkpoints, frozen parameters stay put."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from tolerances import assert_close

from minipeft import kernels
from minipeft.checkpoint import check_output_dir
from minipeft.data import load_task, task_batch
from minipeft.model import GPT, GPTConfig
from minipeft.tokenizer import ByteTokenizer
from minipeft.train import TrainConfig, TrainingDivergedError, _padded_length, lr_at, pad_batch, resolve_device, train
from minipeft.tuners import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model


@pytest.fixture(autouse=True)
def _reference_kernels():
    """The PyTorch LoRA route: under TRITON_INTERPRET (set on CPU by conftest) "auto" would interpret Triton."""
    with kernels.use_backend("reference"):
        yield


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


@pytest.mark.parametrize("method", ["gpt", "lora"])
def test_compiled_training_takes_the_same_steps_as_eager(method):
    """TrainConfig(compile=True): the same losses and weights as eager, step for step (aot_eager traces the
    forward and backward as Inductor would, without needing a C++ compiler)."""
    def model():
        m = tiny_gpt()
        return m if method == "gpt" else get_peft_model(m, LoraConfig(r=2, target_modules="all-linear"))

    cfg = dict(steps=4, lr=3e-3, warmup_steps=1, seed=3)
    eager, compiled = model(), model()
    a = train(eager, sentiment_batches(), TrainConfig(**cfg, compile=False), progress=False)
    b = train(compiled, sentiment_batches(), TrainConfig(**cfg, compile=True, compile_backend="aot_eager"),
              progress=False)
    torch._dynamo.reset()
    assert_close(torch.tensor(b.losses), torch.tensor(a.losses))
    theirs = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():
        assert_close(theirs[name], p)


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
    assert sorted(f.name for f in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # the whole GPT
    again = GPT.from_pretrained(tmp_path)
    idx = torch.randint(0, 256, (1, 12))
    assert torch.equal(again(idx)[0], model(idx)[0])
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries


@pytest.mark.parametrize("config", [LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                                    PromptTuningConfig(num_virtual_tokens=4)], ids=["lora", "prompt"])
def test_a_peft_model_checkpoint_is_its_adapter_and_reloads_on_a_fresh_base(tmp_path, config):
    base = tiny_gpt()
    fresh_base = copy.deepcopy(base)  # get_peft_model wraps `base` in place
    pm = get_peft_model(base, config)
    train(pm, sentiment_batches(), TrainConfig(steps=2, warmup_steps=1), checkpoint_dir=tmp_path / "ckpt",
          progress=False)
    saved = tmp_path / "ckpt"
    assert sorted(f.name for f in saved.iterdir()) == ["adapter_config.json", "adapter_manifest.json",
                                                       "adapter_model.safetensors"]
    again = PeftModel.from_pretrained(fresh_base, str(saved)).eval()
    idx = torch.randint(0, 256, (2, 12))
    assert torch.equal(again(idx)[0], pm.eval()(idx)[0])


def test_an_existing_file_as_checkpoint_dir_fails_before_the_first_step(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    drawn = []
    batches = sentiment_batches()
    for checkpoint_dir in (blocker, blocker / "sub"):
        with pytest.raises(ValueError, match="a-file"):
            train(tiny_gpt(), lambda g: drawn.append(1) or batches(g), TrainConfig(steps=2, warmup_steps=1),
                  checkpoint_dir=checkpoint_dir, progress=False)
    assert drawn == []  # no batch was drawn: no step ran


def test_check_output_dir_creates_nothing_and_names_what_is_in_the_way(tmp_path):
    assert check_output_dir(tmp_path) == tmp_path  # an existing directory
    nested = tmp_path / "new" / "deeper"
    assert check_output_dir(nested) == nested and not (tmp_path / "new").exists()  # can be made; not made
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"output directory .*a-file.* exists and is not a directory"):
        check_output_dir(blocker)
    with pytest.raises(ValueError, match=r"--out .*sub.* cannot be created: .*a-file.* is not a directory"):
        check_output_dir(blocker / "sub", label="--out")


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


def test_grad_clip_zero_turns_clipping_off(monkeypatch):
    clipped = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, norm: clipped.append(norm))
    train(tiny_gpt(), sentiment_batches(), TrainConfig(steps=2, grad_clip=0.0), progress=False)
    assert clipped == []
    train(tiny_gpt(), sentiment_batches(), TrainConfig(steps=2, grad_clip=0.5), progress=False)
    assert clipped == [0.5, 0.5]


def test_step_loss_is_the_mean_of_the_micro_batch_losses(monkeypatch):
    """The loss a step reports (summed on the device, read once a step) against the micro-batches' own losses."""
    seen = []
    forward = GPT.forward

    def spy(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        seen.append(out[1].item())
        return out

    monkeypatch.setattr(GPT, "forward", spy)
    result = train(tiny_gpt(), sentiment_batches(), TrainConfig(steps=2, grad_accum=3), progress=False)
    mean = [sum(x / 3 for x in seen[:3]), sum(x / 3 for x in seen[3:])]  # float64, summed in the same order
    assert result.losses == mean


@pytest.mark.parametrize("bad", [dict(steps=0), dict(lr=0.0), dict(batch_size=0), dict(grad_clip=-1.0)])
def test_bad_train_config(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig(**bad)


@pytest.mark.parametrize("bad,error,message", [
    (dict(pad_multiple=0), ValueError, r"pad_multiple must be >= 1 \(1: batches are not padded\), got 0"),
    (dict(pad_multiple=-64), ValueError, r"pad_multiple must be >= 1 .*got -64"),
    (dict(pad_multiple=None), TypeError, r"pad_multiple must be an int, got NoneType None"),
    (dict(compile_backend=3), TypeError, r"compile_backend must be a str .*got int 3"),
    (dict(compile_backend=""), ValueError, r"compile_backend must name a torch.compile backend"),
    (dict(compile_mode=3), TypeError, r"compile_mode must be one of .*got int 3"),
    (dict(lr=10**400), ValueError, r"lr must be finite"),  # an int past the float range: not an OverflowError
    (dict(lr=math.nan), ValueError, r"lr must be finite, got nan"),
    (dict(min_lr_ratio=math.inf), ValueError, r"min_lr_ratio must be finite, got inf"),
    (dict(seed=-1), ValueError, r"seed must be an int in \[0, 2\*\*63\), got -1"),
    (dict(seed=2**64), ValueError, r"seed must be an int in \[0, 2\*\*63\)"),
    (dict(warmup_steps=-1), ValueError, r"warmup_steps.*>= 0"),
    (dict(grad_accum=0), ValueError, r"grad_accum must be > 0, got 0"),
])
def test_each_train_config_field_is_checked_with_its_name_and_value(bad, error, message):
    with pytest.raises(error, match=message):
        TrainConfig(**bad)
    assert TrainConfig(pad_multiple=1, compile_backend="aot_eager", seed=2**63 - 1).pad_multiple == 1  # the edges


@pytest.mark.parametrize("device,error,message", [
    ("gpu", ValueError, r"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu'"),
    ("meta", ValueError, r"device must be .*got 'meta'"),
    ("cuda:99", ValueError, r"device 'cuda:99'"),  # no CUDA here, or fewer than 100 devices
    (3, TypeError, r"device must be .* or a torch.device, got int 3"),
    (None, TypeError, r"device must be .*got NoneType None"),
])
def test_resolve_device_names_the_device_it_cannot_use(device, error, message):
    with pytest.raises(error, match=message):
        resolve_device(device)
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")


def nan_from_step(bad_step: int, value: float = math.nan):
    """A loss_fn: the model's loss, times `value` from step `bad_step` (1-based) on, so its gradients follow."""
    calls = []

    def loss_fn(net, idx, targets, mask):
        calls.append(1)
        _, loss = net(idx, targets=targets, attention_mask=mask, return_logits=False)
        return loss * value if len(calls) >= bad_step else loss

    loss_fn.calls = calls
    return loss_fn


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_loss_stops_the_run_and_nothing_after_it_is_saved(tmp_path, value):
    """Step 2's loss is not finite: train raises there, naming the step and the loss; the checkpoint of step 1
    stays the last one, step 2 is not logged, and checkpoint_dir gets no model."""
    loss_fn = nan_from_step(2, value)
    with pytest.raises(TrainingDivergedError, match=rf"loss at step 2 of 5 is {value} \(not finite\).*trained "
                                                    r"weights are not finite; they were not saved") as raised:
        train(tiny_gpt(), sentiment_batches(4), TrainConfig(steps=5, warmup_steps=1), loss_fn=loss_fn,
              checkpoint_dir=tmp_path / "model", run_dir=tmp_path / "run", save_every=1, progress=False)
    assert isinstance(raised.value, ValueError) and raised.value.step == 2
    assert len(loss_fn.calls) == 2  # no step after the one that diverged
    assert not (tmp_path / "model").exists()
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["step"] == 1
    assert [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]


def test_non_finite_gradients_under_a_finite_loss_are_caught_before_any_save(tmp_path):
    """The loss is finite, but a gradient is NaN: the optimizer step leaves NaN weights that no loss has shown
    yet. They are caught before a training checkpoint and before the final save."""
    def poisoned():
        model = tiny_gpt()
        model.lm_head.weight.register_hook(lambda grad: torch.full_like(grad, math.nan))
        return model

    with pytest.raises(TrainingDivergedError, match=r"after step 1 the trained weights .*transformer\.wte\.weight"
                                                    r".* are not finite .*not saved"):
        train(poisoned(), sentiment_batches(4), TrainConfig(steps=1, warmup_steps=1),
              checkpoint_dir=tmp_path / "model", progress=False)
    assert not (tmp_path / "model").exists()
    with pytest.raises(TrainingDivergedError, match=r"after step 1 the trained weights"):
        train(poisoned(), sentiment_batches(4), TrainConfig(steps=3, warmup_steps=1), run_dir=tmp_path / "run",
              save_every=1, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_padding_for_static_shapes_leaves_the_loss_and_gradients_unchanged():
    """A compiled run pads each batch to a multiple of pad_multiple tokens (CUDA graphs replay fixed shapes):
    masked positions that predict nothing, so the loss and the gradients are those of the unpadded batch."""
    model = get_peft_model(tiny_gpt(), LoraConfig(r=2, init_lora_weights=False))
    idx, targets, mask = next(iter([sentiment_batches()(torch.Generator().manual_seed(0))]))
    T = idx.shape[1]
    length = _padded_length(model, T, 32)
    assert T % 32 and length == -(-T // 32) * 32 <= 96, (T, length)
    losses, grads = [], []
    for batch in ((idx, targets, mask), pad_batch(idx, targets, mask, length)):
        model.zero_grad(set_to_none=True)
        loss = model(batch[0], targets=batch[1], attention_mask=batch[2], return_logits=False)[1]
        loss.backward()
        losses.append(loss)
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert_close(losses[1], losses[0])
    for padded, plain in zip(*grads, strict=True):
        assert_close(padded, plain)
    # never past the positions left: block_size 96 minus 10 virtual tokens of a soft prompt
    prompt = get_peft_model(tiny_gpt(), PromptTuningConfig(num_virtual_tokens=10))
    assert _padded_length(prompt, 70, 64) == 86 and _padded_length(prompt, 64, 64) == 64
    assert _padded_length(model, 70, 1) == 70
    with pytest.raises(ValueError, match="compile_mode"):
        TrainConfig(compile_mode="fast")


def test_a_base_cache_without_its_last_file_is_not_taken_as_complete(tmp_path, monkeypatch):
    """pretrain_and_cache writes pretrain.json after the model: a save killed in between leaves a cache that is
    made again (here: refused, as train_if_missing=False asks), never one that is loaded half-written."""
    from minipeft.pretrain import base_dir, load_base

    monkeypatch.setenv("MINIPEFT_CACHE", str(tmp_path))
    tiny_gpt().save_pretrained(base_dir("tiny"))  # the model, but no pretrain.json
    with pytest.raises(ValueError, match="no cached base model"):
        load_base("tiny", train_if_missing=False, progress=False)
