"""kernels/launcher.py: a kernel's compiled form kept per specialization and launched again without the JIT.

On the CPU, with a stand-in for a Triton kernel that records how it is called: the first call of a specialization
goes through the JIT (``kernel[grid](*args, **meta)``), the next ones to the kept compiled kernel with the
constexprs in the signature's order, and every change that Triton specializes on goes through the JIT again.
The real kernel kept and launched again: tests/test_nf4_rows.py, on a GPU.
"""

import pytest
import torch

from minipeft.kernels import launcher


class Compiled:
    """A compiled kernel: ``compiled[grid](*args, stream=...)`` launches it."""
    function = "the CUfunction"

    def __init__(self, launches):
        self.launches = launches

    def __getitem__(self, grid):
        return lambda *args, stream: self.launches.append(("kept", grid, args, stream))


class Kernel:
    """A JIT function: ``kernel[grid](*args, **meta)`` compiles on a miss and launches."""
    arg_names = ["x_ptr", "n", "scale", "BLOCK", "EVEN"]

    def __init__(self, compiles=True):
        self.launches, self.compiles = [], compiles

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.launches.append(("jit", grid, args, meta))
            return Compiled(self.launches) if self.compiles else None
        return run


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(launcher, "_current_stream", lambda device_index: 1000 + device_index)
    launcher.clear()
    yield
    launcher.clear()


def _launch(kernel, x, n=17, scale=2.0, block=128, even=True, warps=4, device=0):
    launcher.launch(kernel, (3, 2), (x, n, scale), dict(EVEN=even, BLOCK=block), dict(num_warps=warps), device)


def test_the_first_call_compiles_the_next_launch_what_it_kept():
    kernel, x = Kernel(), torch.zeros(64)
    _launch(kernel, x)
    _launch(kernel, x)
    _launch(kernel, torch.ones(64), scale=3.0)  # another tensor at an aligned address, another float: the same
    assert kernel.launches == [
        ("jit", (3, 2), (x, 17, 2.0), dict(EVEN=True, BLOCK=128, num_warps=4)),
        ("kept", (3, 2, 1), (x, 17, 2.0, 128, True), 1000),                  # BLOCK, EVEN: the signature's order
        ("kept", (3, 2, 1), (kernel.launches[2][2][0], 17, 3.0, 128, True), 1000)]


@pytest.mark.parametrize("change", [
    dict(x="2 bytes past an aligned address"), dict(x="another dtype"), dict(n=1), dict(n=32),
    dict(n=2**31 + 1), dict(block=64), dict(even=False), dict(warps=8), dict(device=1)])
def test_what_triton_specializes_on_compiles_again(change):
    """A pointer's 16-byte alignment, a tensor's dtype, an int equal to 1, a multiple of 16 or past int32, a
    constexpr, an option, the device: each is a kernel of its own, which the JIT compiles."""
    kernel, x = Kernel(), torch.zeros(64, dtype=torch.float16)
    _launch(kernel, x)
    kw = dict(change)
    if "x" in kw:
        kw["x"] = x[1:] if kw["x"].startswith("2 bytes") else x.float()
    for _ in range(2):
        _launch(kernel, **{"x": x, **kw})
    assert [how for how, *_ in kernel.launches] == ["jit", "jit", "kept"]


def test_without_a_compiled_kernel_every_call_goes_to_the_jit():
    """Under the interpreter a launch returns no compiled kernel: nothing is kept."""
    kernel = Kernel(compiles=False)
    for _ in range(3):
        _launch(kernel, torch.zeros(8))
    assert [how for how, *_ in kernel.launches] == ["jit"] * 3
