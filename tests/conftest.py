"""Shared test setup: hypothesis profiles, the Triton interpreter switch, and one tiny pretrained model."""

from __future__ import annotations

import os

import torch

# The Triton interpreter is read when a kernel is decorated, so it must be set before `import minipeft`.
# On a machine without CUDA, every Triton test runs through it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# "ci": deterministic (derandomized, no deadline) so the same commit always runs the same examples.
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=25, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# "dev": random examples for finding new bugs locally; still no deadline (CPU timing is noisy).
settings.register_profile(
    "dev", deadline=None, max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


import copy  # noqa: E402

import pytest  # noqa: E402

# Under CI a test may skip only for these reasons, each matched whole: the GPU a test needs is missing, or (on a
# GPU) a test of the CPU interpreter does not apply. A reference library that fails to import (transformers, peft,
# bitsandbytes, the notebook runner), or a Triton that cannot run, must fail the run, not skip what needs it.
CI_SKIP_REASONS = {
    "needs CUDA",
    "needs CUDA: two devices",
    "needs a Hopper (or newer) GPU",
    "needs a Hopper GPU (sm_90)",
    "auto on CUDA tensors runs the routes: test_auto_on_cuda_takes_the_measured_route",
    "the launch lock guards the CPU interpreter; a GPU takes none",
}


def _fail_unexpected_skip(report) -> None:
    if not (os.environ.get("CI") and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if reason.removeprefix("Skipped: ") not in CI_SKIP_REASONS:
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where only a missing GPU may skip a test: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_unexpected_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_unexpected_skip(outcome.get_result())


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> str:
    """$MINIPEFT_CACHE for the session: yours if set (reused across runs), else a fresh temporary one."""
    if not os.environ.get("MINIPEFT_CACHE"):
        os.environ["MINIPEFT_CACHE"] = str(tmp_path_factory.mktemp("minipeft-cache"))
    return os.environ["MINIPEFT_CACHE"]


@pytest.fixture(scope="session")
def tiny_base(model_cache):
    """The "tiny" preset (2 layers, 64 wide, 150 steps): enough language for mechanics, too little for
    adapters to learn a task on a frozen base. Never modify it: take `tiny_model` for a private copy."""
    from minipeft.pretrain import load_base

    return load_base("tiny", progress=False)


@pytest.fixture
def tiny_model(tiny_base):
    """A private copy of the tiny pretrained GPT, free to wrap, train or break."""
    return copy.deepcopy(tiny_base)


@pytest.fixture(scope="session")
def pretrained_base(model_cache):
    """The "default" base (1.3M parameters; pretrained once per cache, ~2 CPU minutes): what PEFT methods
    are trained on when a test checks that they learn a task. Never modify it: take `pretrained_model`."""
    from minipeft.pretrain import load_base

    return load_base("default", progress=False)


@pytest.fixture
def pretrained_model(pretrained_base):
    """A private copy of the default pretrained base."""
    return copy.deepcopy(pretrained_base)


@pytest.fixture(scope="session")
def tokenizer():
    from minipeft.tokenizer import ByteTokenizer

    return ByteTokenizer()
