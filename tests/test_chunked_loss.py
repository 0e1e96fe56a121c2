"""The chunked loss (return_logits=False): the same loss and gradients as F.cross_entropy on whole logits,
without ever keeping all of the (B·T, vocab) logits, forward or backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close
from torch._dynamo.testing import AotEagerAndRecordGraphs

from minipeft import kernels
from minipeft.model import GPT, GPTConfig, chunked_cross_entropy, head_logits
from minipeft.tuners import LoraConfig, PromptTuningConfig, get_peft_model

CFG = GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=50, block_size=32)


@pytest.fixture(autouse=True)
def reference_kernels():
    with kernels.use_backend("reference"):
        yield


@given(rows=st.integers(1, 40), chunk_rows=st.integers(1, 17), ignored=st.floats(0.0, 0.9), seed=st.integers(0, 9))
def test_chunked_cross_entropy_equals_the_whole_one(rows, chunk_rows, ignored, seed):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(16, 50)
    x = torch.randn(rows, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (rows,), generator=g)
    targets[torch.rand(rows, generator=g) < ignored] = -100
    targets[0] = 3  # at least one position to learn from
    loss = chunked_cross_entropy(head, x, targets, chunk_rows)
    grads = torch.autograd.grad(loss, [x, head.weight, head.bias])
    expected = F.cross_entropy(head(x).float(), targets, ignore_index=-100)
    assert_close(loss, expected)
    for got, want in zip(grads, torch.autograd.grad(expected, [x, head.weight, head.bias]), strict=True):
        assert_close(got, want)


@given(vocab=st.integers(1, 70), align=st.sampled_from([1, 8, 64]), lead=st.sampled_from([(), (5,), (2, 3)]),
       bf16_autocast=st.booleans(), seed=st.integers(0, 9))
def test_head_logits_with_the_vocabulary_padded_equal_the_head(vocab, align, lead, bf16_autocast, seed):
    """head_logits pads the weight's vocabulary rows to a multiple of `align` (on CUDA, for cuBLAS's aligned
    GEMMs) and cuts the logits back: the head's own logits, and the same gradients to x and to the weight, in
    fp32 and under bf16 autocast (where the padded weight is made in bf16, as F.linear would cast it)."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(16, vocab, bias=False)
    x = torch.randn(*lead, 16, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
        got, want = head_logits(head, x, align), head(x)
    assert got.shape == want.shape == (*lead, vocab) and got.dtype == want.dtype
    assert_close(got, want, dtype=got.dtype)
    probe = torch.randn(want.shape, generator=g)
    for a, b in zip(torch.autograd.grad((got.float() * probe).sum(), [x, head.weight]),
                    torch.autograd.grad((want.float() * probe).sum(), [x, head.weight]), strict=True):
        assert_close(a, b, dtype=got.dtype)


def test_head_logits_leave_other_heads_as_they_are():
    """A head with a bias, or one wrapped by an adapter (LoRA on lm_head), runs as it is."""
    x = torch.randn(4, 16)
    for head in (torch.nn.Linear(16, 50, bias=True),
                 get_peft_model(GPT(CFG), LoraConfig(r=2, target_modules=["lm_head"])).base_model.lm_head):
        calls: list[int] = []
        hook = head.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        assert_close(head_logits(head, x, align=64), head(x))
        hook.remove()
        assert len(calls) == 2, type(head).__name__


def saved_shapes(run) -> list[tuple[int, ...]]:
    """The shapes of every tensor autograd saves for the backward while `run()` builds the graph."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return shapes


@pytest.mark.parametrize("method", ["gpt", "lora_on_lm_head", "prompt"])
def test_model_loss_matches_and_whole_logits_are_never_saved(method, monkeypatch):
    torch.manual_seed(0)
    model = GPT(CFG).train()
    if method == "lora_on_lm_head":
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head", "c_fc"], init_lora_weights=False))
    elif method == "prompt":
        model = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=3))
    monkeypatch.setattr("minipeft.model.LOSS_CHUNK_BYTES", 4 * 50 * 7)  # 7 rows a chunk: several chunks
    idx = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(1))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -100
    twin = copy.deepcopy(model)

    logits, loss = model(idx, targets=targets, return_logits=False)
    assert logits is None
    _, expected = twin(idx, targets=targets)
    assert_close(loss, expected)
    loss.backward()
    expected.backward()
    theirs = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is not None or theirs[name].grad is not None:
            assert_close(p.grad, theirs[name].grad)

    # Logits are the only tensors whose last dimension is the vocabulary (50): the whole-logits path saves
    # them (B·T rows) for the backward; the chunked path saves none at all (each chunk is recomputed).
    whole = saved_shapes(lambda: twin(idx, targets=targets))
    assert any(s and s[-1] == 50 and torch.Size(s).numel() >= 3 * 10 * 50 for s in whole), whole
    chunked = saved_shapes(lambda: model(idx, targets=targets, return_logits=False))
    assert not any(s and s[-1] == 50 for s in chunked), chunked


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd")  # torch's own recording backend
@pytest.mark.parametrize("bias", [False, True])
def test_compiled_chunked_loss_equals_the_whole_one(bias):
    """Compiled, a chunk's loss is written out as logsumexp − the target's logit, with no log-softmax for Inductor
    to keep alive: the traced forward holds logsumexp and no log_softmax or nll_loss, and the loss and gradients
    are F.cross_entropy's — ignored and int32 targets included, and a chunk whose targets are all ignored."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    x = torch.randn(23, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (23,), generator=g, dtype=torch.int32)
    targets[::4] = -100
    targets[5:10] = -100  # the second chunk of 5 rows: nothing to learn from
    torch._dynamo.reset()
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(lambda x: chunked_cross_entropy(head, x, targets, 5), backend=backend, fullgraph=True)
    loss = compiled(x)
    ops = {str(node.target) for graph in backend.fw_graphs for node in graph.graph.nodes}
    assert "aten.logsumexp.default" in ops and not any("log_softmax" in op or "nll_loss" in op for op in ops), ops
    expected = F.cross_entropy(head(x), targets.long(), ignore_index=-100)
    assert_close(loss, expected)
    params = [x, head.weight] + ([head.bias] if bias else [])
    for got, want in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params), strict=True):
        assert_close(got, want)


def test_int32_targets_give_the_int64_loss_on_both_paths():
    """targets may be int32 (GPT.forward accepts them); both the whole-logits and the chunked loss use them."""
    model = GPT(CFG)
    idx = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    want = model(idx, targets=idx)[1]
    for return_logits in (True, False):
        assert_close(model(idx, targets=idx.int(), return_logits=return_logits)[1], want)


def test_return_logits_false_needs_targets():
    with pytest.raises(ValueError, match="return_logits=False needs targets"):
        GPT(CFG)(torch.zeros(1, 4, dtype=torch.long), return_logits=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_gpt2s_vocabulary_is_padded_and_gives_the_same_loss():
    """GPT-2's 50,257 logits a row under bf16 autocast on CUDA: head_logits computes them against the weight
    padded to 50,304 rows (rows of the result keep that stride), and they, the chunked loss and its gradients
    equal the unpadded head's."""
    g = torch.Generator(device="cuda").manual_seed(0)
    head = torch.nn.Linear(768, 50257, bias=False).cuda()
    x = torch.randn(700, 768, device="cuda", generator=g, requires_grad=True)
    targets = torch.randint(0, 50257, (700,), device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, want = head_logits(head, x), head(x)
        assert got.stride() == (50304, 1) and got.shape == want.shape
        assert_close(got, want)
        loss = chunked_cross_entropy(head, x, targets, chunk_rows=300)
        expected = F.cross_entropy(head(x).float(), targets)
    assert_close(loss, expected, dtype=torch.bfloat16)
    for a, b in zip(torch.autograd.grad(loss, [x, head.weight]), torch.autograd.grad(expected, [x, head.weight]),
                    strict=True):
        assert_close(a, b, dtype=torch.bfloat16)
