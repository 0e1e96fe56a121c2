"""The measurement module: the one latency statistic on a scripted clock, and state_bytes against formulas."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from minipeft import measure


class ScriptedClock:
    """A stand-in for time.perf_counter that returns the given readings in order."""

    def __init__(self, readings: list[float]):
        self.readings = list(readings)

    def __call__(self) -> float:
        return self.readings.pop(0)


def clock_for(durations_s: list[float]) -> ScriptedClock:
    """Readings (start, end) per timed call such that the calls take these durations, in order."""
    readings, t = [], 100.0
    for d in durations_s:
        readings += [t, t + d]
        t += d + 1.0
    return ScriptedClock(readings)


def test_median_ms_is_the_median_not_the_mean_or_the_minimum(monkeypatch):
    calls = []
    durations = [0.005, 0.001, 0.100, 0.004, 0.006]  # one slow outlier, one lucky run
    clock = clock_for(durations)
    monkeypatch.setattr(measure.time, "perf_counter", clock)
    ms = measure.median_ms(lambda: calls.append(1), repeats=5, warmup=2)
    assert ms == pytest.approx(5.0)  # median of 1, 4, 5, 6, 100 ms; the mean would be 23.2, the minimum 1
    assert len(calls) == 2 + 5  # the warm-up calls run, untimed
    assert clock.readings == []  # exactly two clock readings per timed call


def test_even_repeats_average_the_two_middle_runs(monkeypatch):
    monkeypatch.setattr(measure.time, "perf_counter", clock_for([0.001, 0.002, 0.003, 0.010]))
    assert measure.median_ms(lambda: None, repeats=4, warmup=0) == pytest.approx(2.5)


def test_round_robin_interleaves_the_candidates_and_times_each(monkeypatch):
    order = []
    # rounds: a, b, a, b, a, b (warm-up round untimed) -> timed durations in that order
    monkeypatch.setattr(measure.time, "perf_counter",
                        clock_for([0.010, 0.002, 0.030, 0.001, 0.020, 0.003]))
    ms = measure.round_robin_ms({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                repeats=3, warmup=1)
    assert order == ["a", "b"] * 4  # one warm-up round, then three timed rounds, each candidate in turn
    assert ms == {"a": pytest.approx(20.0), "b": pytest.approx(2.0)}


def test_generation_latency_is_per_generated_token(monkeypatch):
    class FakeModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = []

        def generate(self, idx, max_new_tokens):
            self.calls.append(max_new_tokens)
            return idx

    model = FakeModel()
    monkeypatch.setattr(measure.time, "perf_counter", clock_for([0.080, 0.040, 0.160]))
    ms = measure.generation_ms_per_token({"m": model}, torch.zeros(1, 3, dtype=torch.long), new_tokens=8,
                                         repeats=3)
    assert ms == {"m": pytest.approx(80.0 / 8)}
    assert model.calls == [8] * 4  # the warm-up generates as many tokens as the timed calls


def test_bad_repeats_are_a_clear_error():
    with pytest.raises(ValueError, match="repeats"):
        measure.median_ms(lambda: None, repeats=0)


class Tiny(nn.Module):
    """A frozen Linear(5→4) + a trainable Linear(4→3, no bias) + a trainable vector + a buffer."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.frozen = nn.Linear(5, 4, dtype=dtype).requires_grad_(False)
        self.head = nn.Linear(4, 3, bias=False, dtype=dtype)
        self.scale = nn.Parameter(torch.ones(3, dtype=dtype))
        self.register_buffer("codes", torch.zeros(7, dtype=torch.uint8))

    def forward(self, x):
        return self.head(self.frozen(x)) * self.scale


def test_state_bytes_with_adamw_matches_the_formulas():
    model = Tiny()
    before = copy.deepcopy(model.state_dict())
    got = measure.state_bytes(model, lambda m: m(torch.randn(2, 5)).pow(2).mean())
    n_frozen, n_trainable, n_tensors = 5 * 4 + 4, 4 * 3 + 3, 2
    assert got == {
        "weights": 4 * (n_frozen + n_trainable) + 7,  # fp32 parameters + the uint8 buffer
        "trainable": 4 * n_trainable,
        "gradients": 4 * n_trainable,  # one fp32 .grad per trainable parameter
        "optimizer_state": 2 * 4 * n_trainable + 4 * n_tensors,  # AdamW's m and v, plus a 0-d fp32 step each
    }
    # measured on a copy: the model keeps its values and gets no gradients
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_state_bytes_follows_the_dtype_and_the_default_loss_reaches_every_trainable_tensor():
    got = measure.state_bytes(Tiny(dtype=torch.bfloat16))  # surrogate loss: every trainable tensor gets a grad
    n_frozen, n_trainable = 5 * 4 + 4, 4 * 3 + 3
    assert got["weights"] == 2 * (n_frozen + n_trainable) + 7
    assert got["gradients"] == 2 * n_trainable
    assert got["optimizer_state"] == 2 * 2 * n_trainable + 4 * 2  # moments like the parameter (bf16)


def test_state_bytes_of_a_frozen_model_has_no_training_state():
    got = measure.state_bytes(Tiny().requires_grad_(False))
    assert got["trainable"] == got["gradients"] == got["optimizer_state"] == 0


def test_peak_memory_on_the_cpu_is_a_peak_above_the_baseline():
    """A reset forgets an earlier peak, and the peak afterwards sees a block allocated since. The blocks are 64 MiB,
    above glibc's largest mmap threshold (32 MiB): each is fresh pages from the kernel, counted in the resident set
    once touched, and given back when freed, whatever malloc kept from earlier tests."""
    old_peak = torch.ones(64 * 2**20, dtype=torch.uint8)  # touched: the resident set, and so its peak, rise by 64 MiB
    del old_peak
    before = measure.reset_peak_memory("cpu")
    assert measure.peak_memory_mb("cpu") - before < 16  # the earlier peak is gone (a few MiB of interpreter churn)
    block = torch.ones(64 * 2**20, dtype=torch.uint8)
    peak = measure.peak_memory_mb("cpu")
    del block
    assert peak - before >= 63, (before, peak)  # the block, all of it
