"""The adapter state machine, tested as a state machine (hypothesis RuleBasedStateMachine).

Random sequences of add / set (single and stacked) / delete / disable / merge / unmerge / load tensors /
a training step / save + load run on one PeftModel. After every step:
  (a) whenever nothing is merged, the base weights are bit-identical to the start;
  (b) the logits equal an independent computation of the active composition: a fresh GPT from the
      original base weights with each active LoRA's ΔW = s·B·A added to its weights, each active bottleneck
      adapter applied by a forward hook on its sublayer in the active order, and the active soft prompt or
      prefix handed to the GPT by hand (not through PeftModel or any wrapper class);
  (c) `active_adapters` and `merged_adapters` tell the truth (this machine's own record).
Invalid steps (an unknown name, merging what is not active, …) must raise a ValueError and change nothing.
"""

from __future__ import annotations

import copy
import hashlib
import tempfile
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from tolerances import assert_close

from minipeft import kernels
from minipeft.model import GPT, GPTConfig, KVCache
from minipeft.tuners import (
    AdapterConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=32, block_size=24)
NAMES = ("a", "b", "c", "d")
METHODS = {
    "lora_attn": lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False),
    "lora_all": lambda: LoraConfig(r=1, lora_alpha=3, target_modules="all-linear", init_lora_weights=False),
    "pfeiffer": lambda: AdapterConfig(architecture="pfeiffer", reduction_factor=4),
    "houlsby": lambda: AdapterConfig(architecture="houlsby", reduction_factor=8),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=2),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=3),
}
IDX = torch.randint(0, CFG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))


def plain_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).eval()


BASE = {k: v.clone() for k, v in plain_gpt().state_dict().items()}


def base_hashes(model: GPT) -> dict[str, str]:
    """sha256 of each base tensor by its plain name (adapter tensors left out)."""
    out = {}
    for name, t in model.state_dict().items():
        if any(k in name for k in ("lora_", "adapters.")):
            continue
        clean = ".".join(p for p in name.split(".") if p != "base_layer")
        out[clean] = hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()
    return out


BASE_HASHES = base_hashes(plain_gpt())


@torch.no_grad()
def reference_logits(adapters: dict[str, tuple[str, dict[str, torch.Tensor]]], active: list[str]) -> torch.Tensor:
    """The active composition computed by hand on a fresh GPT (see the module docstring)."""
    ref = GPT(CFG).eval()
    ref.load_state_dict(BASE)
    extra = {}
    for name in active:
        method, tensors = adapters[name]
        if method.startswith("lora"):
            config = METHODS[method]()
            for key in tensors:
                if key.endswith(".lora_A.weight"):
                    module = key[: -len(".lora_A.weight")]
                    A, B = tensors[key], tensors[module + ".lora_B.weight"]
                    ref.get_submodule(module).weight += (config.lora_alpha / config.r) * (B @ A)
        elif method in ("pfeiffer", "houlsby"):
            sites = sorted({k.rsplit(".", 2)[0] for k in tensors})  # transformer.h.0.mlp, …
            for site in sites:
                t = {k[len(site) + 1:]: v for k, v in tensors.items() if k.startswith(site + ".")}

                def hook(_module, _inputs, out, t=t):
                    z = F.relu(F.linear(out, t["adapter_down.weight"], t["adapter_down.bias"]))
                    return out + F.linear(z, t["adapter_up.weight"], t["adapter_up.bias"])

                ref.get_submodule(site).register_forward_hook(hook)  # hooks run in the order of `active`
        elif method == "prompt":
            extra["prompt_embeds"] = tensors["prompt_embeddings"]
        else:  # prefix: (n, L·2·C) → per layer keys and values (B, nh, n, hs), peft's layout
            n, L, nh = tensors["prefix_embeddings"].shape[0], CFG.n_layer, CFG.n_head
            kv = tensors["prefix_embeddings"].view(n, 2 * L, nh, CFG.n_embd // nh).permute(1, 2, 0, 3)
            B = IDX.shape[0]
            extra["kv_cache"] = KVCache.from_prefix([kv[2 * l][None].expand(B, -1, -1, -1) for l in range(L)],
                                                    [kv[2 * l + 1][None].expand(B, -1, -1, -1) for l in range(L)])
    return ref(IDX, **extra)[0]


class AdapterStates(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.gpt = plain_gpt()
        self.pm = get_peft_model(self.gpt, METHODS["lora_attn"](), adapter_name="a")
        self.methods = {"a": "lora_attn"}
        self.active = ["a"]
        self.merged: list[str] = []
        self.tmp = tempfile.TemporaryDirectory()

    def teardown(self) -> None:
        self.tmp.cleanup()

    # ------------------------------------------------------------------ helpers
    def expect_refused(self, call, word: str) -> None:
        """An invalid step: a ValueError naming `word`, and nothing changed."""
        before = (self.pm.active_adapters, self.pm.merged_adapters, base_hashes(self.gpt))
        with pytest.raises(ValueError, match=word):
            call()
        assert (self.pm.active_adapters, self.pm.merged_adapters, base_hashes(self.gpt)) == before

    def unmerge_expected(self) -> None:
        self.merged = []

    def input_methods(self, names) -> list[str]:
        return [n for n in names if self.methods[n] in ("prompt", "prefix")]

    # ------------------------------------------------------------------ rules
    @rule(name=st.sampled_from(NAMES), method=st.sampled_from(sorted(METHODS)), seed=st.integers(0, 3))
    def add(self, name, method, seed):
        if name in self.methods:
            self.expect_refused(lambda: self.pm.add_adapter(name, METHODS[method]()), "already exists")
            return
        torch.manual_seed(seed)
        self.pm.add_adapter(name, METHODS[method]())
        with torch.no_grad():  # make every adapter act (zero-initialised ones would hide mistakes)
            for value in self.pm.adapter_state_dict(name).values():
                value.add_(0.3 * torch.randn_like(value))
        self.methods[name] = method

    @rule(data=st.data())
    def set_active(self, data):
        if not self.methods:
            return
        names = data.draw(st.lists(st.sampled_from(sorted(self.methods)), min_size=1, max_size=3, unique=True))
        if len(self.input_methods(names)) > 1:
            self.expect_refused(lambda: self.pm.set_adapter(names), "only one input adapter")
            return
        self.pm.set_adapter(names if len(names) > 1 else names[0])
        if names != self.active:
            self.unmerge_expected()
        self.active = names

    @rule(name=st.sampled_from(NAMES))
    def delete(self, name):
        if name not in self.methods:
            self.expect_refused(lambda: self.pm.delete_adapter(name), "does not exist")
            return
        self.pm.delete_adapter(name)
        if name in self.merged:
            self.unmerge_expected()
        del self.methods[name]
        self.active = [a for a in self.active if a != name]

    @rule()
    def disable(self):
        with self.pm.disable_adapter():
            assert base_hashes(self.gpt) == BASE_HASHES
            with torch.no_grad():
                assert torch.equal(self.pm(IDX)[0], plain_gpt()(IDX)[0])
        self.unmerge_expected()

    @rule()
    def merge(self):
        lora = [n for n in self.active if self.methods[n].startswith("lora")]
        if not lora:
            self.expect_refused(self.pm.merge_adapter, "nothing to merge")
            return
        self.pm.merge_adapter()
        self.merged += [n for n in lora if n not in self.merged]

    @rule(name=st.sampled_from(NAMES))
    def merge_named(self, name):
        if name not in self.methods:
            self.expect_refused(lambda: self.pm.merge_adapter([name]), "does not exist")
        elif not self.methods[name].startswith("lora"):
            self.expect_refused(lambda: self.pm.merge_adapter([name]), "LoRA adapters only")
        elif name not in self.active:
            self.expect_refused(lambda: self.pm.merge_adapter([name]), "not active")
        else:
            self.pm.merge_adapter([name])
            self.merged += [name] if name not in self.merged else []

    @rule()
    def unmerge(self):
        self.pm.unmerge_adapter()
        self.unmerge_expected()

    @rule(name=st.sampled_from(NAMES), seed=st.integers(0, 3))
    def load_tensors(self, name, seed):
        if name not in self.methods:
            self.expect_refused(lambda: self.pm.load_adapter_state_dict(name, {}), "does not exist")
            return
        g = torch.Generator().manual_seed(seed)
        new = {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in self.pm.adapter_state_dict(name).items()}
        self.pm.load_adapter_state_dict(name, new)
        if name in self.merged:
            self.unmerge_expected()

    @rule()
    def train_step(self):
        self.pm.train()
        try:
            if self.merged:
                self.expect_refused(lambda: self.pm(IDX, targets=IDX), "unmerge_adapter")
                return
            params = [p for p in self.pm.parameters() if p.requires_grad]
            if not params:
                return
            _, loss = self.pm(IDX, targets=IDX)
            loss.backward()
            with torch.no_grad():
                for p in params:
                    p -= 0.1 * p.grad
                    p.grad = None
        finally:
            self.pm.eval()

    @rule(name=st.sampled_from(NAMES))
    def save_and_load(self, name):
        if name not in self.methods:
            return
        directory = f"{self.tmp.name}/{name}"
        self.pm.save_adapter(directory, name)
        self.pm.delete_adapter(name)
        self.pm.load_adapter(directory, name)
        if self.active:
            self.pm.set_adapter(self.active)
        self.unmerge_expected() if name in self.merged or (name in self.active and self.merged) else None

    # ------------------------------------------------------------------ invariants
    @invariant()
    def records_tell_the_truth(self):
        assert self.pm.active_adapters == self.active
        assert self.pm.merged_adapters == self.merged

    @invariant()
    def base_untouched_unless_merged(self):
        if not self.merged:
            assert base_hashes(self.gpt) == BASE_HASHES

    @invariant()
    def logits_are_the_active_composition(self):
        adapters = {n: (m, copy.deepcopy(self.pm.adapter_state_dict(n))) for n, m in self.methods.items()}
        with torch.no_grad():
            assert_close(self.pm(IDX)[0], reference_logits(adapters, self.active))


AdapterStates.TestCase.settings = settings(max_examples=100, stateful_step_count=20, deadline=None)


@pytest.mark.filterwarnings("ignore:.*unmerging")
class TestAdapterStates(AdapterStates.TestCase):
    @pytest.fixture(autouse=True)
    def reference_kernels(self):
        with kernels.use_backend("reference"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
