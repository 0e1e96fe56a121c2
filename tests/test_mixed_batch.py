"""Mixed-adapter batches (minipeft/tuners/mixed_batch.py): one adapter per row, one batched pass.

The reference for every row is the same model run on that row alone with its adapter active (or, for a
"__base__" row, with adapters disabled): a mixed batch must give each row exactly that output, and each
adapter the gradients of a batch of its own rows.
"""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close

from minipeft import (
    GPT,
    AdapterConfig,
    GPTConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
    kernels,
)
from minipeft.kernels import multi_lora_routes
from minipeft.tuners import mixed_batch

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=48)


def _model(*adapters: tuple[str, object]):
    """A tiny GPT with the named adapters (the first one active), every LoRA B non-zero."""
    torch.manual_seed(0)
    (first, config), *rest = adapters
    pm = get_peft_model(GPT(CFG), config, adapter_name=first)
    for name, cfg in rest:
        pm.add_adapter(name, cfg)
    with torch.no_grad():  # LoRA's B starts at zero; make every adapter change the output
        for n, p in pm.named_parameters():
            if "lora_B" in n or "adapter_up" in n:
                p.normal_(0, 0.2)
    return pm.eval()


def _alone(pm, idx, name, **kw):
    """The logits of idx with only `name` active (or the base model for "__base__")."""
    if name == "__base__":
        with pm.disable_adapter():
            return pm(idx, **kw)[0]
    pm.set_adapter(name)
    return pm(idx, **kw)[0]


LORA = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
LORA_2 = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"])


def _batch(B=5, T=7, seed=1):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def _force_gathered(monkeypatch) -> list[str]:
    """The route "auto" takes on CUDA for inference (each sequence's adapter gathered), taken on the CPU too;
    returns the list of gathers made."""
    route, gather, gathers = kernels._multi_route, kernels.gather_adapters, []

    def gathered_where_auto_would(name, x, index, adapters, needs_grad, too_big):
        if adapters is not None and multi_lora_routes.choose_route(x, index, adapters, needs_grad) == "gathered":
            return "gathered"
        return route(name, x, index, adapters, needs_grad, too_big)

    monkeypatch.setattr(kernels, "_multi_route", gathered_where_auto_would)
    monkeypatch.setattr(kernels, "gather_adapters", lambda *a: gathers.append("gather") or gather(*a))
    return gathers


@pytest.mark.parametrize("backend", ["reference", "triton", "gathered"])
def test_each_row_gets_what_its_adapter_gives_alone(backend, monkeypatch):
    """LoRA adapters of different ranks and targets, soft prompts of two lengths, a bottleneck adapter and
    the base, in one batch, against each row run alone; on the Triton backend too (the interpreter here), and
    on the gathered route that "auto" takes on CUDA."""
    gathers = _force_gathered(monkeypatch) if backend == "gathered" else None
    pm = _model(("a", LORA), ("b", LORA_2), ("p3", PromptTuningConfig(num_virtual_tokens=3)),
                ("p5", PromptTuningConfig(num_virtual_tokens=5)),
                ("h", AdapterConfig.load("houlsby", reduction_factor=8)))
    names = ["a", "p5", "__base__", "b", "p3", "h", "a"]
    idx = _batch(B=len(names))
    with kernels.use_backend("auto" if gathers is not None else backend), torch.set_grad_enabled(gathers is None):
        logits, _ = pm(idx, adapter_names=names)  # the gathered route serves inference only
    assert logits.shape == (len(names), idx.shape[1], CFG.vocab_size)
    assert gathers is None or len(gathers) == sum(1 for m in pm.modules() if type(m).__name__ == "LoraLinear")
    for row, name in enumerate(names):
        assert_close(logits[row], _alone(pm, idx[row:row + 1], name)[0], dtype="tf32" if backend == "triton" else None)


def test_a_row_of_another_adapter_never_changes_a_row():
    """Row 0's logits do not depend on which adapters the other rows use."""
    pm = _model(("a", LORA), ("b", LORA_2), ("p", PromptTuningConfig(num_virtual_tokens=4)))
    idx = _batch(B=3)
    first = pm(idx, adapter_names=["a", "b", "p"])[0][0]
    again = pm(idx, adapter_names=["a", "a", "__base__"])[0][0]
    assert_close(first, again)


def test_each_adapter_learns_from_its_own_rows_only():
    """Gradients of a summed loss over a mixed batch equal, adapter by adapter, those of its rows alone."""
    pm = _model(("a", LORA), ("b", LORA_2), ("p", PromptTuningConfig(num_virtual_tokens=3)))
    pm.train()
    pm.set_adapter(["a", "b"])  # makes a's and b's parameters trainable
    for p in pm.prompt_encoders["p"].parameters():
        p.requires_grad_(True)
    names = ["a", "b", "p", "a", "__base__"]
    idx = _batch(B=len(names), seed=3)

    def loss_sum(logits, rows):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, CFG.vocab_size),
                                                 idx[rows, 1:].reshape(-1), reduction="sum")

    params = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    mixed = torch.autograd.grad(loss_sum(pm(idx, adapter_names=names)[0], list(range(len(names)))),
                                list(params.values()), allow_unused=True)
    for adapter in ("a", "b", "p"):
        rows = [i for i, n in enumerate(names) if n == adapter]
        alone_logits = pm(idx[rows], adapter_names=[adapter] * len(rows))[0]
        alone = torch.autograd.grad(loss_sum(alone_logits, rows), list(params.values()), allow_unused=True)
        for (name, _), g_mixed, g_alone in zip(params.items(), mixed, alone, strict=True):
            owner = name.split(".")[-2] == adapter or name.startswith(f"prompt_encoders.{adapter}.")
            if not owner:
                continue
            assert g_mixed is not None and g_alone is not None, name
            assert_close(g_mixed, g_alone)


@pytest.mark.parametrize("route", ["auto", "gathered"])
def test_generate_with_one_adapter_per_row_matches_each_row_alone(route, monkeypatch):
    """On the CPU "auto" is the reference; "gathered" is the route "auto" takes on CUDA, which gathers each LoRA
    layer's adapters once for the whole generate call (the prompt and every new token)."""
    gathers = _force_gathered(monkeypatch) if route == "gathered" else []
    pm = _model(("a", LORA), ("p", PromptTuningConfig(num_virtual_tokens=4)), ("b", LORA_2))
    names = ["p", "a", "__base__", "b"]
    idx = _batch(B=len(names), T=5, seed=5)
    out = pm.generate(idx, max_new_tokens=6, adapter_names=names)
    lora_layers = sum(1 for m in pm.modules() if type(m).__name__ == "LoraLinear")
    assert len(gathers) == (lora_layers if route == "gathered" else 0)
    for row, name in enumerate(names):
        if name == "__base__":
            with pm.disable_adapter():
                alone = pm.generate(idx[row:row + 1], max_new_tokens=6)
        else:
            pm.set_adapter(name)
            alone = pm.generate(idx[row:row + 1], max_new_tokens=6)
        assert torch.equal(out[row], alone[0]), (row, name)


@pytest.mark.parametrize("backend,groupings", [("triton", 2), ("reference", 0), ("gathered", 0)])
def test_generate_packs_each_layer_once_and_groups_the_rows_once_per_row_shape(backend, groupings, monkeypatch):
    """The work that does not depend on the token is done once per generate call, not per layer and token: each
    LoRA layer packs its adapters once, and for the Triton kernels the rows are grouped once for the prompt and
    once for the one-token steps (every layer holds the same adapters here), however many tokens are generated;
    the reference's loop (and the gathered route) group nothing."""
    gathers = _force_gathered(monkeypatch) if backend == "gathered" else []
    pm = _model(("a", LORA), ("b", LORA))
    counts = {"pack": 0, "group": 0}
    pack, group = kernels.pack_adapters, kernels.group_rows

    def counted(name, f):
        def call(*args, **kwargs):
            counts[name] += 1
            return f(*args, **kwargs)
        return call

    monkeypatch.setattr(kernels, "pack_adapters", counted("pack", pack))
    monkeypatch.setattr(kernels, "group_rows", counted("group", group))
    names = ["b", "a", "__base__", "a"]
    with kernels.use_backend("auto" if backend == "gathered" else backend):
        pm.generate(_batch(B=4, T=5, seed=7), max_new_tokens=5, adapter_names=names)
    lora_layers = sum(1 for m in pm.modules() if type(m).__name__ == "LoraLinear")
    assert lora_layers == 4 * CFG.n_layer and counts == {"pack": lora_layers, "group": groupings}
    assert len(gathers) == (lora_layers if backend == "gathered" else 0)  # once per layer, for all 6 tokens


def test_without_autograd_the_packing_is_kept_until_an_adapter_changes(monkeypatch):
    """A server calls the model again and again on the same adapters: without autograd each LoRA layer packs
    them once and reuses the packing; an in-place change of an adapter makes a new one (the rows then get the
    changed adapter, exactly as alone), so does a `.to()`, and a call that records autograd packs every time."""
    pm = _model(("a", LORA), ("b", LORA))
    packs = []
    pack = kernels.pack_adapters
    monkeypatch.setattr(kernels, "pack_adapters", lambda *args: packs.append(1) or pack(*args))
    lora_layers = sum(1 for m in pm.modules() if type(m).__name__ == "LoraLinear")
    names, idx = ["b", "a", "__base__", "a"], _batch(B=4, seed=5)
    with torch.no_grad():
        first = pm(idx, adapter_names=names)[0]
        second = pm(idx, adapter_names=names)[0]
        assert len(packs) == lora_layers and torch.equal(first, second)
        for m in pm.modules():
            if type(m).__name__ == "LoraLinear":
                m.lora_B["a"].weight.mul_(-1.0)  # in place: the same tensors, a new version
        changed = pm(idx, adapter_names=names)[0]
        assert len(packs) == 2 * lora_layers
        assert not torch.allclose(changed[1], first[1]) and torch.equal(changed[0], first[0])
        for row, name in enumerate(names):
            assert_close(changed[row], _alone(pm, idx[row:row + 1], name)[0])
        pm.float()  # .to() and friends may move storage without a version change: the packing is dropped
        pm(idx, adapter_names=names)
        assert len(packs) == 3 * lora_layers
    pm.set_adapter(["a", "b"])  # trainable: with autograd recording, the packing carries the gradients
    for _ in range(2):
        pm(idx, adapter_names=names)
    assert len(packs) == 5 * lora_layers


def test_the_active_adapters_are_left_as_they_were():
    pm = _model(("a", LORA), ("b", LORA_2))
    pm.set_adapter("b")
    idx = _batch(B=2)
    before = pm(idx)[0]
    pm(idx, adapter_names=["a", "__base__"])
    assert pm.active_adapters == ["b"]
    assert all(layer.row_route is None for _c, _r, layer in pm._wrappers())
    assert_close(pm(idx)[0], before)


def test_bad_adapter_names_are_refused_clearly():
    pm = _model(("a", LORA), ("pre", PrefixTuningConfig(num_virtual_tokens=2)))
    idx = _batch(B=2)
    with pytest.raises(ValueError, match="2 rows"):
        pm(idx, adapter_names=["a"])
    with pytest.raises(ValueError, match="'nope'.*not an adapter"):
        pm(idx, adapter_names=["a", "nope"])
    with pytest.raises(ValueError, match="prefix tuning"):
        pm(idx, adapter_names=["a", "pre"])
    with pytest.raises(TypeError, match="list of adapter names"):
        pm(idx, adapter_names="a")
    pm.set_adapter("a")
    pm.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        pm(idx, adapter_names=["a", "__base__"])


def test_parallel_runs_the_batch_once_per_adapter():
    """Parallel("a", "h", "p") (the `adapters` library's block): one forward returns every adapter's output for
    the whole batch, child i's rows at i·B … (i+1)·B − 1, each equal to that adapter alone; generate too."""
    from minipeft import Parallel

    pm = _model(("a", LORA), ("h", AdapterConfig.load("pfeiffer", reduction_factor=8)),
                ("p", PromptTuningConfig(num_virtual_tokens=3)))
    idx = _batch(B=2, T=6, seed=7)
    alone = {name: _alone(pm, idx, name) for name in ("a", "h", "p")}
    generated = {}
    for name in ("a", "h", "p"):
        pm.set_adapter(name)
        generated[name] = pm.generate(idx, max_new_tokens=4)
    pm.set_adapter(Parallel("a", "h", "p"))
    assert pm.active_adapters == ["a", "h", "p"]
    logits, loss = pm(idx, targets=idx)
    assert logits.shape == (3 * 2, 6, CFG.vocab_size) and loss is not None
    out = pm.generate(idx, max_new_tokens=4)
    for i, name in enumerate(("a", "h", "p")):
        assert_close(logits[2 * i:2 * i + 2], alone[name])
        assert torch.equal(out[2 * i:2 * i + 2], generated[name]), name


def test_a_repeated_batch_copies_no_index_from_the_host():
    """The index tensors made from names (the rows' adapters, each layer's table, the soft prompts' mask) are made
    once per distinct list and then found again, so a repeated call copies nothing from the host: what lets a
    server capture a mixed batch's forward in a CUDA graph. Another list gets its own tensors."""
    from minipeft.tuners.mixed_batch import RowRoute, prompt_for_rows

    names = ["a", "__base__", "b", "a"]
    first, again = RowRoute.from_names(names, torch.device("cpu")), RowRoute.from_names(list(names), "cpu")
    assert again.rows is first.rows and first.rows.tolist() == [0, -1, 1, 0]
    assert torch.equal(first._index(["b"]), again._index(["b"])) and first._index(["b"]).tolist() == [-1, -1, 0, -1]
    other = RowRoute.from_names(["b", "a", "a", "a"], "cpu")
    assert other.rows is not first.rows and other.rows.tolist() == [0, 1, 1, 1]
    prompts = {"p": torch.ones(2, 3), "q": torch.ones(3, 3)}
    mask = prompt_for_rows(prompts, ["p", "q", "a"])[1]
    assert prompt_for_rows(prompts, ["p", "q", "a"])[1] is mask
    assert mask.tolist() == [[False, True, True], [True, True, True], [False, False, False]]
    pm = _model(("a", LORA), ("b", LORA_2), ("p", PromptTuningConfig(num_virtual_tokens=3)))
    idx, names = _batch(B=4), ["b", "p", "a", "__base__"]
    pm(idx, adapter_names=names)  # the first call makes its tensors
    made = dict(mixed_batch._CONSTANTS)
    pm(idx, adapter_names=names)  # a repeated call finds every one of them
    assert mixed_batch._CONSTANTS.keys() == made.keys()
    assert all(mixed_batch._CONSTANTS[k] is t for k, t in made.items())


def test_what_a_captured_graph_reads_is_held_for_it(monkeypatch):
    """While a CUDA graph is captured (simulated here: the capture check answers yes), the index tensors and the
    packed adapters a mixed batch reads are also held in HELD_BY_GRAPHS: a graph keeps raw addresses, and eager
    calls with other batches recycle the caches that would otherwise be their only owners."""
    pm = _model(("a", LORA), ("b", LORA_2))
    n_lora = sum(1 for m in pm.modules() if type(m).__name__ == "LoraLinear")
    n_with_b = sum(1 for m in pm.modules() if type(m).__name__ == "LoraLinear" and "b" in m.lora_A)
    before = len(mixed_batch.HELD_BY_GRAPHS)
    monkeypatch.setattr(mixed_batch, "capturing", lambda device: True)
    try:
        with torch.no_grad():
            pm(_batch(B=3), adapter_names=["b", "a", "__base__"])
        held = mixed_batch.HELD_BY_GRAPHS[before:]
        assert sum(isinstance(h, kernels.PackedAdapters) for h in held) == n_lora
        assert any(isinstance(h, torch.Tensor) and h.tolist() == [0, 1, -1] for h in held)  # the rows' adapters
        assert n_with_b < n_lora  # layers with a only, and with both: their tables are held too
        assert any(isinstance(h, torch.Tensor) and h.tolist() == [-1, 0, -1] for h in held)  # table of a-only layers
    finally:
        del mixed_batch.HELD_BY_GRAPHS[before:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mixed", [True, False], ids=["mixed batch", "one adapter"])
def test_a_forward_captured_in_a_cuda_graph_follows_new_tokens(mixed):
    """A mixed batch (the gathered route, "auto" on CUDA) and a one-adapter batch, captured once in a CUDA graph
    after a warm-up (measure.cuda_graph, as benchmarks/multi_adapter.py times it): the capture needs no host sync
    (the model's value checks are skipped while capturing), and a replay after new token ids are copied into the same
    tensor gives the eager forward's logits for them."""
    from minipeft.measure import cuda_graph

    pm = _model(("a", LORA), ("b", LORA_2), ("c", LORA)).cuda()
    names = ["a", "b", "__base__", "c", "a", "b"]
    kw = {"adapter_names": names} if mixed else {}
    idx = _batch(B=len(names)).cuda()
    with torch.no_grad():
        replay = cuda_graph(lambda: pm(idx, **kw)[0])
        for seed in (1, 2, 3):
            idx.copy_(_batch(B=len(names), seed=seed))
            logits = replay()
            torch.cuda.synchronize()
            assert_close(logits, pm(idx, **kw)[0], dtype="tf32")
            if mixed:
                for row in (0, 2, 3):
                    assert_close(logits[row], _alone(pm, idx[row:row + 1], names[row])[0], dtype="tf32")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_mixed_training_step_captured_in_a_cuda_graph_trains_as_the_eager_step():
    """A whole training step of a mixed batch (forward, backward on the segmented Triton kernels, AdamW with
    capturable=True), captured once and replayed: each adapter ends where the same eager steps take it."""
    from minipeft.measure import cuda_graph

    names = ["a", "b", "__base__", "a", "b", "b"]
    idx = _batch(B=len(names), seed=4).cuda()
    targets = idx.roll(-1, 1)
    runs = {}
    for mode in ("eager", "graph"):
        pm = _model(("a", LORA), ("b", LORA_2)).cuda().train()
        pm.set_adapter(["a", "b"])
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2, capturable=True)

        def step(pm=pm, opt=opt):
            pm(idx, targets=targets, return_logits=False, adapter_names=names)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        replay = cuda_graph(step, warmup=2) if mode == "graph" else step
        for _ in range(3 if mode == "graph" else 5):  # the capture's warm-up made two steps
            replay()
        torch.cuda.synchronize()
        runs[mode] = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    assert runs["eager"].keys() == runs["graph"].keys()
    for name, eager in runs["eager"].items():
        assert_close(runs["graph"][name], eager, dtype="tf32")


def test_the_benchmark_runs_on_the_cpu(tmp_path):
    """benchmarks/multi_adapter.py end to end on its tiny CPU shape: every row timed in every round, and the
    ratios of the medians with the rounds' spread (the GPU figures in RESULTS.md come from this script)."""
    import json
    import math
    import os
    import subprocess
    import sys

    out = tmp_path / "multi_adapter.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "multi_adapter.py"), "--quick", "--device",
                          "cpu", "--no-hf", "--ns", "1", "4", "--rounds", "2", "--repeats", "1", "--new-tokens", "2",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    for row, times in result["rounds"].items():  # a decode figure is a difference of two timings: noise may sink
        assert len(times) == 2 and all(map(math.isfinite, times)), row  # it below 0 on this tiny shape
        assert "decode" in row or min(times) > 0, row
    assert {"N=4 decode mixed / one adapter", "training: 4 separate steps / one mixed step"} <= set(result["ratios"])
    for ratio, lo, hi in result["ratios"].values():
        assert math.isfinite(ratio) and lo <= hi
