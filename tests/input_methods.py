"""The input-adapter contract checked through get_peft_model, shared by the prefix, prompt and P-tuning tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close

from minipeft.model import GPT
from minipeft.tuners import PeftConfig, get_peft_model


def check_input_method_contract(model: GPT, config: PeftConfig, reference_logits: Callable) -> None:
    """Logits cover the real tokens only and equal `reference_logits(model, adapter, idx)`; the loss is the
    cross-entropy of those logits; gradients reach exactly the adapter's parameters; greedy generation with
    the cache equals greedy recomputation without it; the base is untouched; too long an input is refused."""
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    pm = get_peft_model(model, config)
    adapter = pm.prompt_encoders["default"]
    idx = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    targets[:, :5] = -100
    logits, loss = pm(idx, targets=targets)
    assert logits.shape == (3, 12, model.config.vocab_size)  # real tokens only
    with torch.no_grad():
        assert_close(logits, reference_logits(model, adapter, idx))
    assert_close(loss, F.cross_entropy(logits.reshape(36, -1), targets.reshape(36), ignore_index=-100))
    loss.backward()
    grads = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert grads == {f"prompt_encoders.default.{n}" for n, _ in adapter.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    out = pm.generate(idx, max_new_tokens=5)
    seq = idx
    with torch.no_grad():
        for _ in range(5):  # no cache: the whole sequence behind the virtual tokens every step
            seq = torch.cat([seq, pm(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    for k, v in model.state_dict().items():
        assert torch.equal(v, base_state[k]), k
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        pm(torch.zeros(1, model.config.block_size - 2, dtype=torch.long))


def hf_gpt2_and_ours(directory, vocab_size: int):
    """A small random transformers GPT-2 (dropout off) saved to `directory`, and the same weights loaded as a
    minipeft GPT: the pair every HF-peft interop test of an input method starts from."""
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=vocab_size, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)).eval()
    hf.save_pretrained(directory, safe_serialization=True)
    return hf, GPT.from_pretrained(directory).eval()
