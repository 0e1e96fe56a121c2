"""torch.compile traces a training step's forward and loss in one graph, for the GPT and for every method.

Checks that read tensor values on the host (token ids in range, positions within block_size, an all-ones
mask) would break the graph; they run only when not compiling, and the kernel switch keeps its per-thread
stack in a threading.local (a ContextVar breaks the graph). The backward runs outside the compiled function,
through AOTAutograd; here with the "aot_eager" backend, which traces forward and backward like Inductor does
but runs them eagerly (no C++ compiler needed on CI's CPU).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo as dynamo
from tolerances import assert_close

from minipeft import kernels
from minipeft.model import GPT, GPTConfig
from minipeft.tuners import (
    AdapterConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    get_peft_model,
)

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=32)
CONFIGS = {
    "gpt": None,
    "lora": LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False),
    "pfeiffer": AdapterConfig(),
    "houlsby": AdapterConfig(architecture="houlsby"),
    "prefix": PrefixTuningConfig(num_virtual_tokens=3),
    "prefix_projection": PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True),
    "prompt": PromptTuningConfig(num_virtual_tokens=3),
    "ptuning_mlp": PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8),
}
IDX = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
TARGETS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
MASK = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])  # right padding, as in training


@pytest.fixture(autouse=True)
def reference_kernels():
    with kernels.use_backend("reference"):
        yield
    dynamo.reset()


def model_for(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    gpt = GPT(CFG)
    return (gpt if CONFIGS[name] is None else get_peft_model(gpt, CONFIGS[name])).train()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_forward_compiles_without_graph_breaks(name):
    model = model_for(name)

    def loss_of(idx, targets, mask):
        return model(idx, targets=targets, attention_mask=mask)[1]

    explanation = dynamo.explain(loss_of)(IDX, TARGETS, MASK)
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    assert explanation.break_reasons == []


@pytest.mark.parametrize("name", ["gpt", "lora", "houlsby", "prefix", "prompt"])
def test_compiled_loss_and_gradients_equal_eager(name):
    """fullgraph=True: one graph or an error. Dropout is off (p=0 in CFG), so both runs see the same maths."""
    eager = model_for(name)
    compiled = copy.deepcopy(eager)
    step = torch.compile(lambda m, *a: m(*a[:1], targets=a[1], attention_mask=a[2])[1], fullgraph=True,
                         backend="aot_eager")
    loss_eager = eager(IDX, targets=TARGETS, attention_mask=MASK)[1]
    loss_compiled = step(compiled, IDX, TARGETS, MASK)
    assert_close(loss_compiled, loss_eager)
    loss_eager.backward()
    loss_compiled.backward()
    grads = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    assert grads
    for n, p in compiled.named_parameters():
        if n in grads:
            assert_close(p.grad, grads[n])


@pytest.mark.parametrize("name", ["gpt", "lora", "prompt"])
def test_the_trainers_chunked_loss_compiles_without_graph_breaks(name):
    model = model_for(name)

    def loss_of(idx, targets, mask):
        return model(idx, targets=targets, attention_mask=mask, return_logits=False)[1]

    explanation = dynamo.explain(loss_of)(IDX, TARGETS, MASK)
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]


def _lora_ops_in(graphs, op) -> int:
    """How many calls of the LoRA op ``op`` the traced graphs hold."""
    return sum(node.target in (op, op.default) for g in graphs for node in g.graph.nodes)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend,rows,op_name", [
    ("triton", "COMPILED_FUSED_MIN_ROWS", "lora_linear_triton"),
    ("auto", "COMPILED_FUSED_MIN_ROWS", "lora_linear_triton"),
    ("auto", "MERGED_TRAIN_MIN_ROWS", "lora_linear_merged_train"),
])
def test_lora_on_cuda_compiles_to_one_op_per_layer_and_matches_the_reference(backend, rows, op_name):
    """On CUDA, "triton" puts the Triton op in the graph; "auto" the Triton op from COMPILED_FUSED_MIN_ROWS rows
    and the merged-weight training op from MERGED_TRAIN_MIN_ROWS (bf16, no dropout): one node per LoRA layer and
    no graph break; Inductor's compiled loss and gradients equal the reference's."""
    from minipeft.kernels import lora_routes

    torch.manual_seed(0)
    rows = getattr(lora_routes, rows)
    T = rows // 2 + 8                                        # 2 sequences: just over the row count
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=128, block_size=T)
    model = get_peft_model(GPT(cfg).cuda().to(torch.bfloat16),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
    reference = copy.deepcopy(model)
    idx = torch.randint(0, 128, (2, T), device="cuda")
    targets = idx.roll(-1, 1)

    def loss_of(m):
        return lambda i, t: m(i, targets=t, return_logits=False)[1]

    with kernels.use_backend(backend):
        explanation = dynamo.explain(loss_of(model))(idx, targets)
        assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
        op = getattr(torch.ops.minipeft, op_name)
        assert _lora_ops_in(explanation.graphs, op) == 4 * cfg.n_layer   # c_attn, c_proj, c_fc, mlp c_proj
        dynamo.reset()
        loss = torch.compile(loss_of(model), fullgraph=True)(idx, targets)
        loss.backward()
    loss_ref = loss_of(reference)(idx, targets)
    loss_ref.backward()
    assert_close(loss.float(), loss_ref.float(), dtype=torch.bfloat16)
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert len(grads) == 2 * 4 * cfg.n_layer
    # bf16 end to end, and Inductor rounds its fused layer norms and softmax differently from eager: a few
    # roundings more than one op's, hence scale=4 on the bf16 tolerance (relative to each gradient's largest)
    for n, p in model.named_parameters():
        if n in grads:
            norm = grads[n].abs().max().clamp_min(1e-6)
            assert_close(p.grad.float() / norm, grads[n].float() / norm, dtype=torch.bfloat16, scale=4.0)
