"""Worked solutions to the exercises of the bottleneck-adapter chapter (notebooks/04_adapters.ipynb).

Each solution is followed, in ``main``, by the check the chapter's check cell makes. Run from the notebooks
directory (or anywhere):

    python notebooks/solutions/04_adapters.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the notebooks directory, for `checks`

from checks.ch04 import check_adapter_param_count, check_bottleneck_forward, check_identity_init  # noqa: E402


# Exercise 1 — a bottleneck adapter's forward pass.
def bottleneck_forward(h, W_down, b_down, W_up, b_up):
    """h + W_up·ReLU(W_down·h + b_down) + b_up; h (..., d), W_down (m, d), W_up (d, m).

    The residual h is what makes a zero up-projection the identity; the non-linearity between the two
    projections is what makes an adapter more than a low-rank linear map (and why it cannot be merged into W₀).
    """
    z = F.relu(h @ W_down.T + b_down)  # (..., m)  the bottleneck
    return h + z @ W_up.T + b_up       # (..., d)  back to the width, added to the input


# Exercise 2 — the parameter count of Pfeiffer and Houlsby at a reduction factor.
def adapter_param_count(architecture, n_layer, d, reduction_factor):
    """Per adapter 2·d·m + m + d (W_down, W_up, b_down, b_up) with m = d // rf; Pfeiffer puts one adapter in each
    block (after the MLP), Houlsby two (after attention and after the MLP)."""
    m = d // reduction_factor  # integer division: d = 30, rf = 7 gives m = 4
    per_block = {"pfeiffer": 1, "houlsby": 2}[architecture]
    return n_layer * per_block * (2 * d * m + m + d)


# Exercise 3 — an adapter that starts as the identity and can still learn.
def identity_init(adapter):
    """Zero the up-projection (weight and bias): up(·) = 0, so adapter(h) = h exactly. Keep the down-projection
    random (Kaiming-uniform, nn.Linear's default) with a zero bias: ReLU(W_down·h) is then non-zero for about
    half the units, so W_up gets a gradient at the first step. With W_down = 0 too, ReLU(0) = 0 and neither
    projection would ever receive a gradient."""
    with torch.no_grad():
        nn.init.kaiming_uniform_(adapter.adapter_down.weight, a=math.sqrt(5))  # (m, d)
        nn.init.zeros_(adapter.adapter_down.bias)                               # (m,)
        nn.init.zeros_(adapter.adapter_up.weight)                               # (d, m)
        nn.init.zeros_(adapter.adapter_up.bias)                                 # (d,)


def main() -> None:
    check_bottleneck_forward(bottleneck_forward)
    check_adapter_param_count(adapter_param_count)
    check_identity_init(identity_init)


if __name__ == "__main__":
    main()
