"""NF4 on the kernel switch: the dequantization's backends and their precedence, the NF4 linear op (it keeps the
4-bit codes for backward, never the dense weight), its gradients, and what torch.compile sees of it.

On a CPU-only machine conftest.py sets TRITON_INTERPRET=1 before `kernels` is imported, so "triton" runs the
dequantization kernel in the interpreter (small shapes; fp32 and fp16 only: the interpreter rounds bf16
wrongly). The tests marked `gpu` run the compiled kernel, bf16 included.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close

from minipeft import kernels
from minipeft.kernels import nf4_autograd, nf4_triton
from minipeft.model import GPT, GPTConfig
from minipeft.quant import NF4Linear, dequantize_nf4, nf4_nbytes, quantize_model, quantize_nf4
from minipeft.quant.nf4 import kernel_arguments
from minipeft.tuners import LoraConfig, LoraLinear, get_peft_model

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TRITON_RUNS = kernels.available_backends()["triton"] == "ok"
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason=f"triton: {kernels.available_backends()['triton']}")
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


@pytest.fixture(autouse=True)
def _clean_switch(monkeypatch):
    """No set_backend and no MINIPEFT_KERNEL before or after a test."""
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    kernels.set_backend(None)
    yield
    kernels.set_backend(None)


def nf4_layer(out_features, in_features, *, bias=True, blocksize=64, double_quant=True, seed=0, device=DEVICE):
    torch.manual_seed(seed)
    return NF4Linear.from_linear(nn_linear(in_features, out_features, bias, device), blocksize, double_quant)


def nn_linear(in_features, out_features, bias=True, device=DEVICE):
    return torch.nn.Linear(in_features, out_features, bias=bias, device=device)


def dense_reference(layer: NF4Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What NF4Linear computed before the op: dequantize, then an ordinary F.linear (autograd keeps Ŵ)."""
    return F.linear(x, layer.dequantize_weight(x.dtype), bias)


# ----------------------------------------------------------------------------------------------------------
# Memory: what a QLoRA layer keeps for backward
# ----------------------------------------------------------------------------------------------------------
def saved_for_backward(fn) -> list[torch.Tensor]:
    """Every tensor autograd saves while ``fn()`` runs forward (``saved_tensors_hooks``)."""
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_qlora_layer_saves_less_than_its_dense_weight(dtype):
    """The QLoRA layer keeps the codes (half a byte per weight) and the small LoRA tensors for backward: never
    an (out, in) tensor, and less than a third of the dense weight's bytes all together. LoRA on the dense
    base keeps the weight itself (F.linear saves it for dX), which is what QLoRA used to do."""
    out_features, in_features = 384, 256
    qlora = LoraLinear(nf4_layer(out_features, in_features, device="cpu"))
    lora = LoraLinear(nn_linear(in_features, out_features, device="cpu").to(dtype))
    for layer in (qlora, lora):
        layer.add_adapter("default", r=4, lora_alpha=8)
        layer.active_adapters = ["default"]
    x = torch.randn(2, 3, in_features, dtype=dtype, requires_grad=True)  # grads flow on to earlier layers

    def is_dense_weight(t):  # Ŵ (out, in), or its transpose as the matmul saves it
        return t.dtype.is_floating_point and t.numel() == out_features * in_features

    saved = saved_for_backward(lambda: qlora(x).sum())
    dense_bytes = out_features * in_features * torch.finfo(dtype).bits // 8
    assert not any(is_dense_weight(t) for t in saved), [(tuple(t.shape), t.dtype) for t in saved]
    assert nbytes(saved) < dense_bytes / 3, (nbytes(saved), dense_bytes)
    assert any(t.dtype == torch.uint8 and t.numel() == out_features * in_features // 2 for t in saved)  # codes
    lora_saved = saved_for_backward(lambda: lora(x).sum())
    assert any(is_dense_weight(t) for t in lora_saved)  # the contrast: Ŵ is kept there


# ----------------------------------------------------------------------------------------------------------
# Gradients: the op against dequantize-then-linear
# ----------------------------------------------------------------------------------------------------------
@given(
    out_features=st.integers(1, 48), in_features=st.integers(1, 48), lead=st.sampled_from([(), (3,), (2, 5)]),
    blocksize=st.sampled_from([32, 64, 256]), double_quant=st.booleans(), bias=st.sampled_from(["none", "frozen",
    "trained"]), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)  # fmt: skip
def test_op_and_gradients_equal_dequantize_then_linear(out_features, in_features, lead, blocksize, double_quant,
                                                       bias, dtype):  # fmt: skip
    layer = nf4_layer(out_features, in_features, bias=bias != "none", blocksize=blocksize,
                      double_quant=double_quant, seed=out_features * 64 + in_features, device="cpu")  # fmt: skip
    x = torch.randn(*lead, in_features, dtype=dtype, requires_grad=True)
    b = None if layer.bias is None else layer.bias.detach().to(dtype).requires_grad_(bias == "trained")
    args = (*kernel_arguments(layer.nf4_weight()), b, out_features, in_features, blocksize, 256)
    y = kernels.nf4_linear(x, *args, backend="reference")
    x_ref = x.detach().clone().requires_grad_()
    b_ref = None if b is None else b.detach().clone().requires_grad_(b.requires_grad)
    y_ref = dense_reference(layer, x_ref, b_ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert y.shape == (*lead, out_features) and y.dtype == dtype
    assert_close(y, y_ref)
    assert_close(x.grad, x_ref.grad)
    if bias == "trained":
        assert_close(b.grad, b_ref.grad)


def test_nf4_linear_layer_goes_through_the_op_and_keeps_its_contract():
    """NF4Linear.forward is kernels.nf4_linear: same numbers as before, no gradient to the 4-bit state, and
    under CPU autocast it computes in the autocast dtype, as F.linear would."""
    layer = nf4_layer(24, 40, device="cpu")
    x = torch.randn(3, 40, requires_grad=True)
    y = layer(x)
    assert_close(y, dense_reference(layer, x, layer.bias))
    y.sum().backward()
    assert x.grad is not None and layer.bias.grad is None
    assert all(not b.requires_grad for b in layer.buffers())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------
# The switch: which dequantizer runs, and the precedence
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def ran(monkeypatch):
    """Which dequantizer ran, in order: "reference" or "triton" (the kernel's wrapper, recorded and run)."""
    calls: list[str] = []

    def record(module, name, label):
        real = getattr(module, name)

        def recorded(*args, **kwargs):
            calls.append(label)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, recorded)

    record(nf4_autograd, "nf4_dequantize_reference", "reference")
    record(nf4_triton, "nf4_dequantize_triton", "triton")
    return calls


def _train_step(backend=None, dtype=torch.float32):
    layer = nf4_layer(8, 40, device=DEVICE)
    x = torch.randn(2, 40, device=DEVICE, dtype=dtype, requires_grad=True)
    b = layer.bias.detach().to(dtype)
    kernels.nf4_linear(x, *kernel_arguments(layer.nf4_weight()), b, 8, 40, 64, 256, backend=backend).sum().backward()


@needs_triton
@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
def test_backend_runs_what_its_name_promises(backend, ran):
    """Forward and backward each dequantize once, on the named backend; "auto" on the CPU is the reference
    (the interpreter is only for tests that ask for "triton" by name), on CUDA the Triton kernel."""
    _train_step(backend)
    expected = "triton" if backend == "triton" or (backend == "auto" and CUDA) else "reference"
    assert ran == [expected, expected], ran


@needs_triton
def test_precedence_call_then_use_backend_then_set_backend_then_env(monkeypatch, ran):
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    _train_step()
    assert ran[-1] == "triton"  # the environment variable
    kernels.set_backend("reference")
    _train_step()
    assert ran[-1] == "reference"  # set_backend beats the environment
    with kernels.use_backend("triton"):
        _train_step()
        assert ran[-1] == "triton"  # use_backend beats set_backend
        _train_step(backend="reference")
        assert ran[-1] == "reference"  # the call's backend= beats everything
    q = quantize_nf4(torch.randn(5, 70), 32, double_quant=False)
    ran.clear()
    with kernels.use_backend("triton"):
        dequantize_nf4(q)
    dequantize_nf4(q, backend="triton")
    assert ran == ["triton", "triton"]  # minipeft.quant.dequantize_nf4 sits on the same switch


def test_backward_uses_the_backend_resolved_in_forward(ran):
    """The backward runs after the `with` block (on autograd's thread, even): it keeps the forward's choice."""
    layer = nf4_layer(8, 40, device=DEVICE)
    x = torch.randn(2, 40, device=DEVICE, requires_grad=True)
    with kernels.use_backend("reference"):
        y = layer(x)
    with kernels.use_backend("triton" if TRITON_RUNS else "reference"):
        y.sum().backward()
    assert ran == ["reference", "reference"]


# ----------------------------------------------------------------------------------------------------------
# The Triton kernel on the switch against the reference (the interpreter on the CPU)
# ----------------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("shape, blocksize, double_quant", [((7, 37), 64, True), ((33, 9), 32, False),
                                                            ((16, 70), 256, True)])  # fmt: skip
def test_triton_backend_equals_the_reference(shape, blocksize, double_quant, dtype):
    """Dequantization to the dtype's tolerance (both compute in fp32 and round once: bit for bit in the
    interpreter; a GPU may fuse the absmax decode's multiply-add into one FMA), then the layer's output and input
    gradient (the same Ŵ, the same matmul)."""
    out_features, in_features = shape
    layer = nf4_layer(out_features, in_features, blocksize=blocksize, double_quant=double_quant)
    q = layer.nf4_weight()
    assert_close(dequantize_nf4(q, dtype, backend="triton"), dequantize_nf4(q, dtype, backend="reference"))
    x = torch.randn(2, 3, in_features, device=DEVICE, dtype=dtype)
    grads = {}
    for backend in ("triton", "reference"):
        xb = x.clone().requires_grad_()
        with kernels.use_backend(backend):
            y = layer(xb)
        y.backward(torch.ones_like(y))
        grads[backend] = (y, xb.grad)
    for got, want in zip(grads["triton"], grads["reference"], strict=True):
        assert_close(got, want)


@needs_triton
def test_triton_op_passes_opcheck():
    """The dequantization op's schema and fake against the kernel (no autograd: the state is not trainable)."""
    q = quantize_nf4(torch.randn(9, 35, device=DEVICE), 32, double_quant=True)
    args = (*kernel_arguments(q), q.numel, q.blocksize, q.dq_blocksize, torch.float16)
    torch.library.opcheck(torch.ops.minipeft.nf4_dequantize_triton.default, args)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_op_passes_opcheck(bias):
    """The NF4 linear op's schema, fake, autograd registration and AOT trace agree with the op (reference route)."""
    layer = nf4_layer(6, 40, bias=bias, device="cpu")
    x = torch.randn(2, 3, 40, requires_grad=True)
    b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    args = (x, *kernel_arguments(layer.nf4_weight()), b, 6, 40, 64, 256, "reference")
    torch.library.opcheck(torch.ops.minipeft.nf4_linear.default, args)


# ----------------------------------------------------------------------------------------------------------
# Errors at the boundary
# ----------------------------------------------------------------------------------------------------------
def _call_args(layer):
    return (*kernel_arguments(layer.nf4_weight()), layer.bias, layer.out_features, layer.in_features, 64, 256)


def test_triton_refusals_say_why():
    layer = nf4_layer(4, 32, device="cpu")
    with pytest.raises(ValueError, match="triton"):
        kernels.nf4_linear(torch.randn(2, 32, dtype=torch.float64), *kernel_arguments(layer.nf4_weight()), None,
                           4, 32, 64, 256, backend="triton")  # fmt: skip
    if TRITON_RUNS and not CUDA:  # the interpreter: bf16 is refused by name
        with pytest.raises(ValueError, match="interpreter"):
            dequantize_nf4(layer.nf4_weight(), torch.bfloat16, backend="triton")
    with pytest.raises(ValueError, match="unknown kernel backend 'fast'"):
        dequantize_nf4(layer.nf4_weight(), backend="fast")


@pytest.mark.parametrize("change, error, words", [
    (lambda a: {**a, "x": torch.randn(2, 31)}, ValueError, "expected \\(..., 32\\)"),
    (lambda a: {**a, "x": torch.ones(2, 32, dtype=torch.long)}, TypeError, "floating"),
    (lambda a: {**a, "codes": a["codes"][:-1]}, ValueError, "codes must be torch.uint8 of shape"),
    (lambda a: {**a, "absmax": a["absmax"].float()}, ValueError, "absmax must be torch.uint8"),
    (lambda a: {**a, "absmax_scale": None}, ValueError, "absmax_offset is given without absmax_scale"),
    (lambda a: {**a, "bias": a["bias"].double()}, TypeError, "bias has dtype torch.float64"),
    (lambda a: {**a, "bias": a["bias"][:-1]}, ValueError, "bias must have shape \\(4,\\)"),
    (lambda a: {**a, "blocksize": 0}, ValueError, "blocksize must be a positive int"),
    # the kernels tile whole blocks (tl.arange(0, blocksize // 2)): 4 and 96 gave wrong results on "triton"
    (lambda a: {**a, "blocksize": 4, "absmax": a["absmax"].repeat(16)}, ValueError, "power of two from 32 to 4096"),
    (lambda a: {**a, "blocksize": 96}, ValueError, "power of two from 32 to 4096.*got int 96"),
    (lambda a: {**a, "blocksize": 8192}, ValueError, "power of two from 32 to 4096"),
    (lambda a: {**a, "nf4_values": None}, TypeError, "nf4_values must be a torch.Tensor"),
])  # fmt: skip
def test_bad_arguments_are_named(change, error, words):
    layer = nf4_layer(4, 32, device="cpu")
    names = ["codes", "absmax", "absmax_scale", "absmax_offset", "nf4_values", "dq_values", "bias",
             "out_features", "in_features", "blocksize", "dq_blocksize"]  # fmt: skip
    good = {"x": torch.randn(2, 32), **dict(zip(names, _call_args(layer), strict=True))}
    with pytest.raises(error, match=words):
        kernels.nf4_linear(**change(good))


def _mutations(good: dict):
    """(name, arguments) for many calls that differ from ``good`` in one argument: other types, dtypes, shapes,
    devices (``meta``), values."""
    for name, v in good.items():
        if isinstance(v, torch.Tensor):
            bad = [None, 1.0, v.double(), v.to(torch.uint8), v.to(torch.float32), v.flatten()[:-1], v.unsqueeze(0),
                   v.to("meta"), v.reshape(-1)[:1].reshape(())]
        elif isinstance(v, bool) or v is None:
            bad = [torch.ones(4), 1]
        elif isinstance(v, int):
            bad = [0, -v, v + 1, v * 2, v // 2, float(v), True, None]
        else:  # scaling
            bad = [math.nan, math.inf, -math.inf, "2", True, 10**400, torch.tensor(2.0), None, 2]
        for b in bad:
            yield name, {**good, name: b}


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("mask", [False, True])
def test_the_quick_checks_pass_only_calls_the_full_checks_pass(double_quant, mask):
    """``nf4_linear`` and ``nf4_lora_linear`` check a call in a few attribute reads (``_nf4_looks_valid``,
    ``_bias_looks_valid``, ``_adapter_looks_valid``) and make the checks one by one, whose errors name the problem,
    only where those fail: the quick checks pass a good call, and of 110-140 calls that each change one argument
    none that the checks one by one refuse."""
    layer = nf4_layer(4, 64, device="cpu", double_quant=double_quant)
    names = ["codes", "absmax", "absmax_scale", "absmax_offset", "nf4_values", "dq_values", "bias", "out_features",
             "in_features", "blocksize", "dq_blocksize"]
    good = {"x": torch.randn(2, 3, 64), **dict(zip(names, _call_args(layer), strict=True)),
            "lora_A": torch.randn(5, 64), "lora_B": torch.randn(4, 5), "scaling": 0.5,
            "dropout_mask": torch.ones(2, 3, 64) if mask else None}

    def quick(a, adapter=True):  # nf4_linear's quick checks; with adapter=True, nf4_lora_linear's
        return (isinstance(a["x"], torch.Tensor) and kernels._bias_looks_valid(a["x"], a["bias"], a["out_features"])
                and kernels._nf4_looks_valid(*[a[n] for n in ["x"] + names if n != "bias"])
                and (not adapter or isinstance(a["lora_A"], torch.Tensor) and isinstance(a["lora_B"], torch.Tensor)
                     and kernels._adapter_looks_valid(a["x"], a["out_features"], a["in_features"], a["bias"],
                                                      a["lora_A"], a["lora_B"], a["scaling"], a["dropout_mask"])))

    def refused(a, adapter=True):  # the checks one by one, as the calls make them where the quick ones fail
        try:
            kernels._check_nf4_layer_fully(*[a[n] for n in ["x"] + names])
            if adapter:
                weight = a["x"].new_empty(()).expand(a["out_features"], a["in_features"])
                kernels._validate(a["x"], weight, a["bias"], a["lora_A"], a["lora_B"], a["scaling"],
                                  a["dropout_mask"])
        except (TypeError, ValueError):
            return True
        return False

    assert quick(good) and not refused(good)
    kernels._nf4_lora_checked(*good.values(), "reference", "test")   # and the call's checks pass it
    tried = refused_count = 0
    for name, a in _mutations(good):
        tried += 1
        for adapter in (False, True):
            if refused(a, adapter):
                refused_count += adapter
                assert not quick(a, adapter), (f"the quick checks pass a call the full checks refuse: "
                                               f"{name}={a[name]!r} (adapter={adapter})")
    assert tried > 100 and refused_count > 80


# ----------------------------------------------------------------------------------------------------------
# torch.compile: a QLoRA model's training forward is one graph
# ----------------------------------------------------------------------------------------------------------
CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=32)
IDX = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
TARGETS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def qlora_model() -> torch.nn.Module:
    torch.manual_seed(0)
    base = quantize_model(GPT(CFG), blocksize=32)
    return get_peft_model(base, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)).train()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_qlora_forward_and_loss_compile_without_graph_breaks(backend):
    """Dynamo records one op node per quantized LoRA layer (minipeft::nf4_linear plus the low-rank term's ops
    on the reference; the fused minipeft::nf4_lora_linear_triton on "triton"), with no graph break."""
    if backend == "triton" and not TRITON_RUNS:
        pytest.skip(kernels.available_backends()["triton"])
    dynamo.reset()
    model = qlora_model()
    with kernels.use_backend(backend):
        explanation = dynamo.explain(lambda idx, t: model(idx, targets=t)[1])(IDX, TARGETS)
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    assert explanation.break_reasons == []
    dynamo.reset()


def test_compiled_qlora_loss_and_gradients_equal_eager():
    """fullgraph=True: one graph or an error; the backward (AOTAutograd, "aot_eager") gives the eager gradients."""
    dynamo.reset()
    eager = qlora_model()
    compiled = copy.deepcopy(eager)
    with kernels.use_backend("reference"):
        step = torch.compile(lambda m, idx, t: m(idx, targets=t)[1], fullgraph=True, backend="aot_eager")
        loss_compiled = step(compiled, IDX, TARGETS)
        loss_eager = eager(IDX, targets=TARGETS)[1]
    loss_compiled.backward()
    loss_eager.backward()
    assert_close(loss_compiled, loss_eager)
    grads = {n: p.grad for n, p in compiled.named_parameters() if p.requires_grad}
    for name, p in eager.named_parameters():
        if p.requires_grad:
            assert_close(grads[name], p.grad, scale=10)  # fp32 sums in another order: a few ulps more
    dynamo.reset()


# ----------------------------------------------------------------------------------------------------------
# GPU: the compiled kernel, bf16, and the memory a QLoRA step really holds
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape, blocksize", [((4096, 4096), 64), ((2304, 768), 64), ((1000, 333), 4096)])
def test_triton_layer_on_gpu(shape, blocksize, dtype):
    out_features, in_features = shape
    layer = nf4_layer(out_features, in_features, blocksize=blocksize)
    q = layer.nf4_weight()
    assert_close(dequantize_nf4(q, dtype, backend="triton"), dequantize_nf4(q, dtype, backend="reference"))
    x = torch.randn(8, 64, in_features, device="cuda", dtype=dtype)
    outs = {}
    for backend in ("triton", "reference"):
        xb = x.clone().requires_grad_()
        y = kernels.nf4_linear(xb, *kernel_arguments(q), layer.bias.to(dtype), out_features, in_features,
                               blocksize, 256, backend=backend)  # fmt: skip
        y.backward(torch.ones_like(y))
        outs[backend] = (y, xb.grad)
    for got, want in zip(outs["triton"], outs["reference"], strict=True):
        assert_close(got, want, scale=math.sqrt(in_features / 64))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_qlora_step_peaks_below_lora_on_gpu():
    """A stack of eight 4096 x 4096 layers in bf16: QLoRA's training peak is below LoRA's by what its 4-bit
    weights save, less at most two dense weights (the one being dequantized, and its product: the op keeps
    the codes for backward, never Ŵ). Before the op, every layer's Ŵ was kept until backward."""
    n_layers, one_weight = 8, 4096 * 4096 * 2

    def peak(quantized: bool) -> int:
        torch.cuda.empty_cache()
        layers = [nn_linear(4096, 4096, bias=False, device="cuda").to(torch.bfloat16) for _ in range(n_layers)]
        if quantized:
            layers = [NF4Linear.from_linear(m) for m in layers]
        model = torch.nn.Sequential(*[LoraLinear(m) for m in layers])
        for m in model:
            m.add_adapter("default", r=16, lora_alpha=16)
            m.active_adapters = ["default"]
        x = torch.randn(8, 512, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        model(x).float().pow(2).mean().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    lora, qlora = peak(False), peak(True)
    saved_by_4_bit = n_layers * (one_weight - nf4_nbytes(4096 * 4096, 64, double_quant=True))
    assert lora - qlora >= saved_by_4_bit - 2 * one_weight, (lora, qlora, saved_by_4_bit)
