"""Adapter composition (composition.py) and AdapterFusion (fusion.py): the blocks as values, Stack = a list,
Average and Fuse against formulas written out by hand from the adapter and fusion modules' weights, what
trains, files, the bookkeeping (active_adapters / active_composition) and the errors."""

from __future__ import annotations

import copy
import json
import os
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close

from minipeft.model import GPT, GPTConfig
from minipeft.tuners import (
    AdapterConfig,
    AdapterFusion,
    Average,
    Fuse,
    LoraConfig,
    Parallel,
    PeftModel,
    PromptTuningConfig,
    Stack,
    get_peft_model,
)
from minipeft.tuners import composition as composition_module
from minipeft.tuners.composition import composition_from_dict
from minipeft.tuners.io import (
    COMPOSITION_NAME,
    FUSION_CONFIG_NAME,
    FUSION_MANIFEST_NAME,
    FUSION_WEIGHTS_NAME,
)

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=32, block_size=24)
D = CFG.n_embd
IDX = torch.randint(0, CFG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))


def plain_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).eval()


@torch.no_grad()
def perturb(params) -> None:
    for p in params:
        p.normal_(std=0.3)


def adapters(names=("a", "b", "c"), architecture: str = "pfeiffer") -> PeftModel:
    """A PeftModel holding bottleneck adapters `names`, each perturbed (a zero-init one would prove nothing)."""
    pm = get_peft_model(plain_gpt(), AdapterConfig.load(architecture, reduction_factor=4), adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, AdapterConfig.load(architecture, reduction_factor=4, non_linearity="tanh"))
    torch.manual_seed(1)
    for name in names:
        perturb(pm.adapter_state_dict(name).values())
    return pm.eval()


def fused(names=("a", "b"), architecture: str = "pfeiffer", fusion_type: str = "dynamic") -> PeftModel:
    """adapters(...) with Fuse(names) added, perturbed and active."""
    pm = adapters(architecture=architecture)
    pm.add_adapter_fusion(Fuse(*names), fusion_type)
    torch.manual_seed(2)
    perturb(pm._fusion_parameters(Fuse(*names).name).values())
    pm.set_adapter(Fuse(*names))
    return pm


def by_hand(adapter: torch.nn.Module, o: torch.Tensor) -> torch.Tensor:
    """δ(o) = up(f(down(o))) written out from the adapter's weights."""
    act = {"relu": F.relu, "tanh": torch.tanh}[adapter.non_linearity]
    down, up = adapter.adapter_down, adapter.adapter_up
    return act(o @ down.weight.T + down.bias) @ up.weight.T + up.bias


def logits(pm: PeftModel) -> torch.Tensor:
    with torch.no_grad():
        return pm(IDX)[0]


# ---------------------------------------------------------------------------------------- the blocks
def test_blocks_are_immutable_values_with_a_json_form():
    blocks = [Stack("a", "b"), Stack("c", Fuse("a", "b")), Parallel("a", "b"), Fuse("a", "b", "c"),
              Average("a", "b", weights=[0.7, 0.3]), Average("a", "b", weights=[1, -1], normalize_weights=False)]
    for block in blocks:
        assert eval(repr(block)) == block and hash(eval(repr(block))) == hash(block)
        assert composition_from_dict(json.loads(json.dumps(block.to_dict()))) == block
        with pytest.raises(AttributeError, match="immutable"):
            block.children = ("x",)
        assert pickle.loads(pickle.dumps(block)) == block and copy.deepcopy(block) == block
    assert Stack("a", "b") != Stack("b", "a") and Stack("a", "b") != Parallel("a", "b")
    assert Average("a", "b") != Average("a", "b", weights=[0.7, 0.3])
    assert Stack("c", Fuse("a", "b")).flatten() == ["c", "a", "b"]
    assert Fuse("a", "b").name == "a,b" and list(Fuse("a", "b")) == ["a", "b"]
    # weights as the library has them: uniform by default, normalised to sum 1 unless told not to
    assert Average("a", "b", "c").weights == (1 / 3, 1 / 3, 1 / 3)
    assert Average("a", "b", weights=[3, 1]).weights == (0.75, 0.25)
    assert Average("a", "b", weights=[1, -1], normalize_weights=False).weights == (1.0, -1.0)


@pytest.mark.parametrize("build, error, match", [
    (lambda: Fuse("a", Stack("b", "c")), ValueError, "cannot hold Stack"),
    (lambda: Stack("a", Average("b", "c")), ValueError, "cannot hold Average"),
    (lambda: Stack("a", Parallel("b", "c")), ValueError, "cannot hold Parallel"),
    (lambda: Average("a", Fuse("b", "c")), ValueError, "cannot hold Fuse"),
    (lambda: Parallel(Stack("a"), "b"), ValueError, "cannot hold Stack"),
    (lambda: Stack("a", Fuse("a", "b")), ValueError, "'a' twice"),
    (lambda: Fuse("a"), ValueError, "at least 2"),
    (lambda: Fuse("a", "b,c"), ValueError, "','"),
    (lambda: Stack(["a", "b"]), TypeError, "not a list"),
    (lambda: Stack("a", 3), TypeError, "adapter names"),
    (lambda: Stack(""), ValueError, "empty adapter name"),
    (lambda: Average("a", "b", weights=[1.0]), ValueError, "1 entries for 2 adapters"),
    (lambda: Average("a", "b", weights=[1.0, float("nan")]), ValueError, "finite"),
    (lambda: Average("a", "b", weights=[1.0, -1.0]), ValueError, "sum to 0"),
    (lambda: Average("a", "b", weights=[1.0, "x"]), TypeError, "real numbers"),
    (lambda: composition_from_dict({"block": "Split", "children": ["a"]}), ValueError, "unknown composition block"),
])
def test_blocks_refuse_what_minipeft_cannot_compute(build, error, match):
    with pytest.raises(error, match=match):
        build()


# ---------------------------------------------------------------------------------------- Stack
def test_a_list_is_a_stack():
    pm = adapters()
    pm.set_adapter(["a", "b"])
    as_list, trainable = logits(pm), {n for n, p in pm.named_parameters() if p.requires_grad}
    assert pm.active_composition == Stack("a", "b") and pm.active_adapters == ["a", "b"]
    pm.set_adapter(Stack("a", "b"))
    assert torch.equal(logits(pm), as_list) and trainable == {n for n, p in pm.named_parameters() if p.requires_grad}
    pm.set_active_adapters("c")
    assert pm.active_composition == Stack("c") and pm.active_adapters == ["c"]
    layer = pm.base_model.transformer.h[0].mlp
    assert layer.composition == Stack("c") and layer.active_adapters == ["c"]
    with pm.disable_adapter():
        assert torch.equal(logits(pm), plain_gpt()(IDX)[0])


# ---------------------------------------------------------------------------------------- Average
@pytest.mark.parametrize("weights, normalize, expected", [
    (None, True, [0.5, 0.5]), ([0.7, 0.3], True, [0.7, 0.3]), ([2, 6], True, [0.25, 0.75]),
    ([1, -1], False, [1.0, -1.0]),
])
def test_average_is_the_weighted_sum_of_the_adapters_written_out(weights, normalize, expected):
    pm = adapters()
    pm.set_adapter(Average("a", "b", weights=weights, normalize_weights=normalize))
    layer = pm.base_model.transformer.h[1].mlp
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        o = layer.base_layer(x)
        deltas = [by_hand(layer.adapters[n], o) for n in ("a", "b")]
        if normalize:  # Σᵢ wᵢ·adapterᵢ(o) with adapterᵢ(o) = o + δᵢ(o), the weights summing to 1
            want = sum(w * (o + d) for w, d in zip(expected, deltas, strict=True))
        else:  # task arithmetic: o + Σᵢ wᵢ·δᵢ(o)
            want = o + sum(w * d for w, d in zip(expected, deltas, strict=True))
        assert_close(layer(x), want)
    assert pm.active_adapters == ["a", "b"]
    assert all(p.requires_grad for n in ("a", "b") for p in pm._adapter_parameters(n).values())
    assert not any(p.requires_grad for p in pm._adapter_parameters("c").values())


def test_average_of_one_weight_is_that_adapter_and_an_absent_adapter_is_the_identity():
    pm = adapters()
    pm.set_adapter("a")
    only_a = logits(pm)
    pm.set_adapter(Average("a", "b", weights=[1.0, 0.0]))
    assert_close(logits(pm), only_a)
    # Houlsby "h" adapts attn and mlp, Pfeiffer "a" only mlp: at attn, a is the identity (δ = 0)
    pm.add_adapter("h", AdapterConfig.load("houlsby", reduction_factor=4))
    perturb(pm.adapter_state_dict("h").values())
    pm.set_adapter(Average("a", "h", weights=[0.25, 0.75]))
    attn = pm.base_model.transformer.h[0].attn
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        o = attn.base_layer(x, None)
        assert_close(attn(x, None), o + 0.75 * by_hand(attn.adapters["h"], o))


# ---------------------------------------------------------------------------------------- Fuse
@pytest.mark.parametrize("fusion_type", ["dynamic", "static"])
def test_fusion_is_the_attention_written_out_from_its_weights(fusion_type):
    pm = fused(("a", "b", "c"), fusion_type=fusion_type)
    layer = pm.base_model.transformer.h[0].mlp
    fusion = layer.adapter_fusion["a,b,c"]
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        o = layer.base_layer(x)  # the query and the residual
        q = o @ fusion.fusion_query.weight.T + fusion.fusion_query.bias
        scores, values = [], []
        for name in ("a", "b", "c"):
            delta = by_hand(layer.adapters[name], o)  # key and value input: the adapter's update
            scores.append((q * (delta @ fusion.fusion_key.weight.T + fusion.fusion_key.bias)).sum(-1))
            values.append(delta @ fusion.fusion_value.weight.T if fusion_type == "dynamic" else delta)
        p = torch.softmax(torch.stack(scores, -1), -1)  # (B, T, 3)
        want = o + sum(p[..., i:i + 1] * values[i] for i in range(3))
        assert_close(layer(x), want)
        assert_close(fusion.last_attention, p)


def test_fusion_starts_as_the_library_initialises_it_near_the_uniform_average():
    pm = adapters()
    pm.add_adapter_fusion(["a", "b"])  # a list works too, as in the library
    assert pm.active_composition == Stack("a") and pm.adapter_fusions == ["a,b"]  # added, not activated
    fusion = pm.base_model.transformer.h[0].mlp.adapter_fusion["a,b"]
    assert torch.equal(fusion.fusion_value.weight, torch.eye(D)) and fusion.fusion_value.bias is None
    for linear in (fusion.fusion_query, fusion.fusion_key):
        assert torch.equal(linear.bias, torch.zeros(D)) and 0.01 < linear.weight.std().item() < 0.03
    pm.set_adapter(Fuse("a", "b"))
    fused_logits = logits(pm)
    for attention in pm.fusion_attention().values():
        assert attention.shape == (2, 6, 2) and (attention - 0.5).abs().max() < 1e-3
    pm.set_adapter(Average("a", "b"))
    assert_close(fused_logits, logits(pm), dtype="tf32")  # close, not equal: the scores are small, not 0


def test_a_fusion_of_two_copies_of_one_adapter_is_that_adapter():
    """Σᵢ pᵢ = 1 and V = I at init: whatever the attention, out = o + δ_a."""
    pm = adapters()
    with torch.no_grad():
        for key, value in pm.adapter_state_dict("b").items():
            pm.adapter_state_dict("c")[key].copy_(value)  # b and c: both tanh, now the same weights
    pm.set_adapter("b")
    only_b = logits(pm)
    pm.add_adapter_fusion(Fuse("b", "c"))
    perturb(p for k, p in pm._fusion_parameters("b,c").items() if "value" not in k)  # any attention at all
    pm.set_adapter(Fuse("b", "c"))
    assert_close(logits(pm), only_b)


@pytest.mark.parametrize("architecture, sites", [("pfeiffer", 1), ("houlsby", 2)])
def test_only_the_fusion_trains_and_it_is_counted(architecture, sites):
    pm = adapters(architecture=architecture)
    pm.add_adapter_fusion(Fuse("a", "b"))
    pm.add_adapter_fusion(Fuse("b", "c"), "static")  # another fusion: frozen, and counted as a parameter
    frozen_total = pm.get_nb_trainable_parameters()[1]
    pm.train_adapter_fusion(Fuse("a", "b"))
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == CFG.n_layer * sites * (3 * D * D + 2 * D) and total == frozen_total
    assert pm.active_adapters == ["a", "b"] and pm.active_composition == Fuse("a", "b")
    pm.train()
    _, loss = pm(IDX, targets=IDX)
    loss.backward()
    got = {n for n, p in pm.named_parameters() if p.grad is not None}
    want = {n for n, p in pm.named_parameters() if "adapter_fusion.a,b." in n}
    assert got == want and len(want) == CFG.n_layer * sites * 5
    assert all(p.grad.abs().sum() > 0 for n, p in pm.named_parameters() if n in want)
    assert set(pm.fusion_attention(Fuse("a", "b"))) == {f"transformer.h.{i}.{s}" for i in range(CFG.n_layer)
                                                       for s in ("attn", "mlp")[2 - sites:]}


def test_training_the_fusion_lowers_the_loss_and_leaves_everything_else_alone():
    pm = adapters()
    with torch.no_grad():  # a random GPT's tied embedding (std 0.02) gives flat logits that hardly move: sharpen it
        pm.base_model.transformer.wte.weight.mul_(10)
    pm.add_adapter_fusion(Fuse("a", "b"), dropout_prob=0.0)
    pm.train_adapter_fusion(Fuse("a", "b"))
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    targets = torch.roll(IDX, -1, dims=1)
    optimizer = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=3e-2)
    pm.train()
    losses = []
    for _ in range(25):
        _, loss = pm(IDX, targets=targets)
        total = loss + pm.fusion_regularization_loss()
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in pm.named_parameters() if n in frozen)
    assert pm.fusion_regularization_loss().item() > 0  # V moved away from the identity


def test_a_stack_can_end_in_a_fusion():
    pm = adapters()
    pm.add_adapter_fusion(Fuse("a", "b"))
    pm.set_adapter(Stack("c", Fuse("a", "b")))
    assert pm.active_adapters == ["c", "a", "b"] and pm.active_composition == Stack("c", Fuse("a", "b"))
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == \
        {n for n, _ in pm.named_parameters() if "adapter_fusion.a,b." in n}  # c is frozen too
    layer = pm.base_model.transformer.h[1].mlp
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        h = layer.adapters["c"](layer.base_layer(x))
        deltas = torch.stack([layer.adapters[n].delta(h) for n in ("a", "b")], dim=-2)
        assert_close(layer(x), layer.adapter_fusion["a,b"](h, deltas))


# ---------------------------------------------------------------------------------------- Parallel
def test_parallel_is_bookkept_and_left_to_the_model_forward():
    pm = adapters()
    pm.set_adapter(Parallel("a", "b"))
    assert pm.active_adapters == ["a", "b"] and pm.active_composition == Parallel("a", "b")
    layer = pm.base_model.transformer.h[0].mlp
    assert layer.composition == Parallel("a", "b")
    with pytest.raises(ValueError, match="Parallel is handled by PeftModel.forward"):
        layer(torch.randn(1, 2, D))


# ---------------------------------------------------------------------------------------- files
def test_a_fusion_file_round_trip_gives_identical_outputs(tmp_path):
    pm = fused()
    want = logits(pm)
    for name in ("a", "b"):
        pm.save_adapter(tmp_path / name, name)
    pm.save_adapter_fusion(tmp_path / "fusion", Fuse("a", "b"))
    assert sorted(os.listdir(tmp_path / "fusion")) == [FUSION_WEIGHTS_NAME, FUSION_CONFIG_NAME, FUSION_MANIFEST_NAME]
    config = json.loads((tmp_path / "fusion" / FUSION_CONFIG_NAME).read_text())
    assert config == {"method": "adapter_fusion", "adapter_names": ["a", "b"], "fusion_type": "dynamic",
                      "dropout_prob": 0.0, "base_model": CFG.to_dict()}
    other = PeftModel.from_pretrained(plain_gpt(), tmp_path / "a", adapter_name="a")
    other.load_adapter(tmp_path / "b", adapter_name="b")
    torch.manual_seed(5)
    assert other.load_adapter_fusion(tmp_path / "fusion", set_active=True) == Fuse("a", "b")
    draw = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(draw, torch.rand(3))  # the fusion's init draws did not move the caller's RNG
    assert torch.equal(logits(other.eval()), want)
    assert other.get_nb_trainable_parameters()[0] == pm.get_nb_trainable_parameters()[0]  # the fusion only


@pytest.mark.parametrize("active", [Stack("a", "b"), Average("a", "c", weights=[0.2, 0.8]), Fuse("a", "b"),
                                    Stack("c", Fuse("a", "b")), Stack("default")], ids=repr)
def test_save_pretrained_restores_the_adapters_fusions_and_active_composition(tmp_path, active):
    pm = adapters(("default", "a", "b", "c"))
    pm.add_adapter_fusion(Fuse("a", "b"))
    perturb(pm._fusion_parameters("a,b").values())
    pm.set_adapter(active)
    want = logits(pm)
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / COMPOSITION_NAME).read_text())
    assert saved == {"composition_version": 1, "adapters": ["default", "a", "b", "c"], "fusions": ["a,b"],
                     "active": active.to_dict()}
    loaded = PeftModel.from_pretrained(plain_gpt(), tmp_path).eval()
    assert loaded.active_composition == active and loaded.adapter_fusions == ["a,b"]
    assert torch.equal(logits(loaded), want)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
        {n for n, p in pm.named_parameters() if p.requires_grad}
    # "default" alone again and no fusion: no composition file (a stale one is removed), as before compositions
    pm.set_adapter("default")
    pm.delete_adapter_fusion(Fuse("a", "b"))
    pm.save_pretrained(tmp_path)
    assert not (tmp_path / COMPOSITION_NAME).exists()


def test_save_pretrained_without_a_default_adapter_loads_back(tmp_path):
    pm = adapters(("a", "b"))
    pm.set_adapter(Average("a", "b", weights=[0.6, 0.4]))
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(plain_gpt(), tmp_path).eval()
    assert loaded.active_composition == Average("a", "b", weights=[0.6, 0.4])
    assert torch.equal(logits(loaded), logits(pm))


def test_a_composition_file_names_adapters_never_paths(tmp_path):
    pm = adapters(("a", "b"))
    pm.set_adapter(Stack("b", "a"))
    pm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="keep their saved names"):
        PeftModel.from_pretrained(plain_gpt(), tmp_path, adapter_name="x")
    path = tmp_path / COMPOSITION_NAME
    saved = json.loads(path.read_text())
    for bad in (["../a"], ["/etc"], [], "a"):
        path.write_text(json.dumps({**saved, "adapters": bad}))
        model = plain_gpt()
        with pytest.raises(ValueError, match=COMPOSITION_NAME):
            PeftModel.from_pretrained(model, tmp_path)
        assert all(p.requires_grad for p in model.parameters())  # refused before anything was wrapped
    path.write_text(json.dumps({**saved, "active": {"block": "Fuse", "children": ["a", "b"]}}))
    model = plain_gpt()
    with pytest.raises(ValueError, match="cannot be restored: .* has no fusion layer"):
        PeftModel.from_pretrained(model, tmp_path)
    assert not any(isinstance(m, AdapterFusion) or hasattr(m, "base_layer") for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # unwrapped again and unfrozen


def test_a_bad_fusion_file_is_refused_and_nothing_is_left(tmp_path):
    pm = fused()
    pm.save_adapter_fusion(tmp_path / "f", "a,b")  # the library's "a,b" spelling works too
    lonely = adapters(("a", "c"))
    with pytest.raises(ValueError, match=r"adapter_fusion_config.json: cannot add the fusion of \['a', 'b'\]: adapter "
                                         r"'b' does not exist"):
        lonely.load_adapter_fusion(tmp_path / "f")
    assert lonely.adapter_fusions == []
    other = adapters()
    weights = tmp_path / "f" / FUSION_WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ValueError, match="does not match adapter_fusion_manifest.json"):
        other.load_adapter_fusion(tmp_path / "f")
    (tmp_path / "f" / FUSION_MANIFEST_NAME).unlink()  # unchecked: the truncated tensors are refused instead
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        other.load_adapter_fusion(tmp_path / "f")
    bigger = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=16, vocab_size=32, block_size=24))
    third = get_peft_model(bigger, AdapterConfig(reduction_factor=4), adapter_name="a")
    third.add_adapter("b", AdapterConfig(reduction_factor=4))
    pm.save_adapter_fusion(tmp_path / "g", Fuse("a", "b"))
    with pytest.raises(ValueError, match="different base model"):
        third.load_adapter_fusion(tmp_path / "g")
    assert other.adapter_fusions == [] and third.adapter_fusions == []


# ---------------------------------------------------------------------------------------- errors, deleting
@pytest.fixture
def mixed() -> PeftModel:
    pm = adapters()
    pm.add_adapter("p", PromptTuningConfig(num_virtual_tokens=2))
    pm.add_adapter("q", PromptTuningConfig(num_virtual_tokens=2))
    pm.add_adapter("lora", LoraConfig(r=2, target_modules=["c_attn"]))
    pm.add_adapter("h", AdapterConfig.load("houlsby", reduction_factor=4))
    pm.add_adapter_fusion(Fuse("a", "b"))
    return pm


@pytest.mark.parametrize("call, match", [
    (lambda pm: pm.set_adapter(Stack("a", "nope")), "adapter 'nope' does not exist"),
    (lambda pm: pm.set_adapter(Average("a", "nope")), "adapter 'nope' does not exist"),
    (lambda pm: pm.set_adapter(Fuse("a", "c")), r"Fuse\('a', 'c'\) has no fusion layer: add it first"),
    (lambda pm: pm.set_adapter(Fuse("b", "a")), "has no fusion layer"),  # the order names the fusion
    (lambda pm: pm.set_adapter(Average("a", "p")), "'p' is an input adapter"),
    (lambda pm: pm.set_adapter(Fuse("p", "a")), "'p' is an input adapter"),
    (lambda pm: pm.set_adapter(Average("a", "lora")), "one method"),
    (lambda pm: pm.set_adapter(Stack("p", "q")), "only one input adapter"),
    (lambda pm: pm.set_adapter([]), "at least one adapter"),
    (lambda pm: pm.add_adapter_fusion(Fuse("a", "lora")), "bottleneck adapters only"),
    (lambda pm: pm.add_adapter_fusion(Fuse("a", "h")), "one architecture"),
    (lambda pm: pm.add_adapter_fusion(Fuse("a", "b")), "already exists"),
    (lambda pm: pm.add_adapter_fusion(Fuse("a", "nope")), "adapter 'nope' does not exist"),
    (lambda pm: pm.add_adapter_fusion(Fuse("a", "c"), "wild"), "fusion_type"),
    (lambda pm: pm.delete_adapter_fusion(Fuse("a", "c")), "fusion 'a,c' does not exist"),
    (lambda pm: pm.train_adapter_fusion(Stack("a")), "needs a Fuse"),
    (lambda pm: pm.fusion_attention(), "name the fusion"),
    (lambda pm: pm.fusion_attention(Fuse("a", "b")), "has not run yet"),
])
def test_bad_compositions_are_clear_errors_that_change_nothing(mixed, call, match):
    before = (mixed.active_composition, mixed.adapter_fusions,
              {n for n, p in mixed.named_parameters() if p.requires_grad})
    with pytest.raises(ValueError, match=match):
        call(mixed)
    assert (mixed.active_composition, mixed.adapter_fusions,
            {n for n, p in mixed.named_parameters() if p.requires_grad}) == before


def test_a_block_no_layer_of_the_method_computes_is_refused(monkeypatch):
    monkeypatch.setitem(composition_module.METHODS_SUPPORTING, Average, ())
    with pytest.raises(ValueError, match="Average is computed by the layers of"):
        adapters().set_adapter(Average("a", "b"))


def test_deleting_what_a_composition_uses():
    pm = adapters()
    pm.set_adapter(Stack("a", "b", "c"))
    pm.delete_adapter("b")  # a Stack loses the name, as a list always did
    assert pm.active_composition == Stack("a", "c") and pm.active_adapters == ["a", "c"]
    pm.add_adapter("b", AdapterConfig(reduction_factor=4))
    pm.add_adapter_fusion(Fuse("a", "b"))
    pm.set_adapter(Stack("c", Fuse("a", "b")))
    with pytest.warns(UserWarning, match="used a deleted adapter or fusion; active now: Stack"):
        pm.delete_adapter_fusion(Fuse("a", "b"))
    assert pm.active_composition == Stack("c")
    pm.add_adapter_fusion(Fuse("a", "b"))
    pm.set_adapter(Fuse("a", "b"))
    with pytest.warns(UserWarning, match="active now: None"):
        pm.delete_adapter("a")  # the fusion goes with the adapter it fused
    assert pm.active_composition is None and pm.active_adapters == [] and pm.adapter_fusions == []
    assert not any(isinstance(m, AdapterFusion) for m in pm.modules())
    assert torch.equal(logits(pm), plain_gpt()(IDX)[0])  # nothing active: the base
    pm.set_adapter(Average("b", "c"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm.set_adapter("c")  # switching away warns about nothing


def test_average_of_lora_adapters_is_their_weighted_sum_and_refuses_to_merge():
    """LoRA under Average: W₀x + Σ wᵢ·(α/r)ᵢ·BᵢAᵢx, which add_weighted_adapter's "cat" adapter gives exactly."""
    pm = get_peft_model(plain_gpt(), LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False),
                        adapter_name="a")
    pm.add_adapter("b", LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"], init_lora_weights=False))
    pm.add_weighted_adapter(["a", "b"], [0.25, 0.75], adapter_name="ab", combination_type="cat")
    pm.set_adapter("ab")
    expected = pm(IDX)[0]
    pm.set_adapter(Average("a", "b", weights=[0.25, 0.75]))
    assert pm.active_adapters == ["a", "b"]
    assert_close(pm(IDX)[0], expected)
    with pytest.raises(ValueError, match="add_weighted_adapter"):
        pm.merge_adapter()


def test_a_nan_fusion_is_not_saved(tmp_path):
    """A fusion holding NaN would be a file that load_adapter_fusion refuses: neither save writes it."""
    pm = adapters()
    pm.add_adapter_fusion(["a", "b"])
    with torch.no_grad():
        pm.base_model.transformer.h[0].mlp.adapter_fusion["a,b"].fusion_query.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="fusion a,b cannot be saved: tensor .* holds NaN"):
        pm.save_adapter_fusion(tmp_path / "fusion", ["a", "b"])
    with pytest.raises(ValueError, match="fusion a,b cannot be saved"):
        pm.save_pretrained(tmp_path / "all")
    assert not (tmp_path / "fusion").exists() and not (tmp_path / "all").exists()
