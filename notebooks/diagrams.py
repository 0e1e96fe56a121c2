"""Where each PEFT method attaches to a GPT-2 block: one labelled drawing per method, no image files.

minipeft's GPT is pre-LN: a block computes `x = x + attn(ln_1(x))`, then `x = x + mlp(ln_2(x))`. The drawing
follows that: the residual stream runs down the left, each sublayer branches off it through its LayerNorm and
is added back at ⊕. Frozen parts are grey; what the method trains is coloured. The placements are the
library's own (minipeft/tuners/): LoRA wraps a Linear (default target `c_attn`); a bottleneck adapter wraps
`block.attn` / `block.mlp` and so acts on the sublayer's output before the residual add; prefix tuning
prepends learned keys and values inside every layer's attention; prompt tuning and P-tuning prepend virtual
tokens to the embedded input, so only layer 0 reads them directly.

    from diagrams import draw_block, draw_all
    draw_block("lora")     # one block, LoRA highlighted
    draw_all()             # the six methods side by side
"""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch

METHODS = {  # name: (title, caption)
    "lora": ("LoRA", "A low-rank path B·A beside a frozen Linear, added to its output (default target: c_attn; "
                     "any Linear can be a target). Mergeable into W₀ after training."),
    "pfeiffer": ("Pfeiffer adapter", "One bottleneck adapter per block, on the MLP's output, before the "
                                     "residual add (pre-LN: the next LayerNorm reads it)."),
    "houlsby": ("Houlsby adapters", "Two bottleneck adapters per block: on the attention's output and on the "
                                    "MLP's output, each before its residual add."),
    "prefix": ("Prefix tuning", "n learned key/value pairs prepended inside the attention of every layer; "
                                "every real token can attend to them."),
    "prompt": ("Prompt tuning", "n learned soft-prompt vectors prepended to the input embeddings; only "
                                "layer 0 reads them directly."),
    "ptuning": ("P-tuning", "Like prompt tuning, but the soft prompt is produced by a small encoder "
                            "(MLP or LSTM) from n learned seed embeddings."),
}
GREY, EDGE, HOT = "#e8e8e8", "#555555", "#f28e2b"
X_STREAM, X_MAIN, W_MAIN = 1.3, 5.2, 4.2  # residual stream; centre and width of the sublayer column
STEP, H = 1.25, 0.9  # vertical distance between boxes; box height


def _box(ax, x, y, w, h, text, fs, hot=False):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.15",
                                fc=HOT if hot else GREY, ec="black" if hot else EDGE, lw=1.4 if hot else 0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=fs, weight="bold" if hot else "normal")


def _arrow(ax, a, b, hot=False, style="-|>"):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=9, lw=1.4 if hot else 0.9,
                                 color=HOT if hot else EDGE, shrinkA=0, shrinkB=0))


def _add(ax, y, fs):
    ax.add_patch(Circle((X_STREAM, y), 0.32, fc="white", ec=EDGE, lw=0.9, zorder=3))
    ax.text(X_STREAM, y, "+", ha="center", va="center", fontsize=fs + 1, zorder=4)


def _sublayer(ax, top, rows, y_add, fs, lora_targets, adapter):
    """A branch off the stream: boxes `rows` = [(label, module name)], downward, then ⊕ back at y_add."""
    _arrow(ax, (X_STREAM, top), (X_MAIN - W_MAIN / 2, top))
    ys = [top - STEP * i for i in range(len(rows) + (adapter is not None))]
    for (label, name), y in zip(rows, ys, strict=False):
        _box(ax, X_MAIN, y, W_MAIN, H, label, fs)
        if any(name == t or name.endswith("." + t) for t in lora_targets):  # low-rank path, summed into the output
            _box(ax, 8.6, y, 1.7, H, "B·A\nrank r", fs, hot=True)
            _arrow(ax, (7.75, y), (X_MAIN + W_MAIN / 2, y), hot=True)
    if adapter is not None:
        _box(ax, X_MAIN, ys[-1], W_MAIN, H, adapter, fs, hot=True)
    for y0, y1 in zip(ys, ys[1:], strict=False):
        _arrow(ax, (X_MAIN, y0 - H / 2), (X_MAIN, y1 + H / 2), hot=adapter is not None and y1 == ys[-1])
    ax.plot([X_MAIN, X_MAIN], [ys[-1] - H / 2, y_add], color=EDGE, lw=0.9)
    _arrow(ax, (X_MAIN, y_add), (X_STREAM + 0.32, y_add))
    _add(ax, y_add, fs)
    return ys


def draw_block(method: str, ax=None, *, lora_targets: tuple[str, ...] = ("c_attn",)):
    """Draw one GPT-2 block and colour where `method` attaches; returns the matplotlib Figure.

    method: one of "lora", "pfeiffer", "houlsby", "prefix", "prompt", "ptuning".
    lora_targets: the Linears LoRA wraps in the drawing: "c_attn", "c_fc", "c_proj" (both), "attn.c_proj", "mlp.c_proj".
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if ax is None:
        _, ax = plt.subplots(figsize=(4.6, 9.0))
    fig = ax.figure
    width_in = ax.get_position().width * fig.get_figwidth()
    fs = min(9.0, max(5.5, 8.5 * width_in / 4.0))
    ax.set_xlim(0, 10)
    ax.set_ylim(-1.9, 17.4)
    ax.axis("off")
    targets = set(lora_targets) if method == "lora" else set()
    soft = method in ("prompt", "ptuning")

    _box(ax, 3.0, 15.2, 5.2, H, "input embeddings\nwte[x] + wpe", fs)
    if soft:  # virtual tokens, placed in front of the real tokens' embeddings
        _box(ax, 8.3, 15.2, 2.6, H, "soft prompt P\n(n vectors)", fs, hot=True)
        _arrow(ax, (7.0, 15.2), (5.6, 15.2), hot=True)
        ax.text(6.3, 15.4, "prepend", ha="center", fontsize=fs - 1, color=HOT)
    if method == "ptuning":
        _box(ax, 8.3, 16.75, 2.6, H, "encoder\n(MLP/LSTM)", fs, hot=True)
        _arrow(ax, (8.3, 16.75 - H / 2), (8.3, 15.2 + H / 2), hot=True)
    ax.plot([X_STREAM, X_STREAM], [15.2 - H / 2, 1.4], color=EDGE, lw=1.6, zorder=0)
    ax.text(X_STREAM - 0.45, 10.5, "residual stream x", rotation=90, ha="center", va="center", fontsize=fs - 1,
            color=EDGE)

    attn = [("ln_1  (LayerNorm)", "ln_1"), ("c_attn: x → q, k, v", "c_attn"),
            ("causal attention\nsoftmax(q·kᵀ/√hs)·v", "attention"), ("c_proj  (C → C)", "attn.c_proj")]
    ys = _sublayer(ax, 13.8, attn, 7.95, fs, targets, "adapter (attn)" if method == "houlsby" else None)
    if method == "prefix":  # learned keys/values joined to the real ones, in this and every layer
        _box(ax, 8.6, ys[2], 1.7, H, "prefix\nPₖ, Pᵥ", fs, hot=True)
        _arrow(ax, (7.75, ys[2]), (X_MAIN + W_MAIN / 2, ys[2]), hot=True)
    mlp = [("ln_2  (LayerNorm)", "ln_2"), ("c_fc  (C → 4C)", "c_fc"), ("GELU", "gelu"),
           ("c_proj  (4C → C)", "mlp.c_proj")]
    adapter = "adapter (mlp)" if method in ("houlsby", "pfeiffer") else None
    _sublayer(ax, 7.1, mlp, 1.25, fs, targets, adapter)
    _arrow(ax, (X_STREAM, 0.93), (X_STREAM, 0.1))
    ax.text(X_STREAM + 0.3, 0.3, "to the next block (× n_layer)", fontsize=fs - 1, va="center", color=EDGE)

    title, caption = METHODS[method]
    ax.set_title(title, fontsize=fs + 3, weight="bold")
    chars = max(28, int(width_in * 72 / (fs * 0.55)))  # characters per caption line at this width
    ax.text(5.0, -0.5, textwrap.fill(caption, chars), ha="center", va="top", fontsize=fs, wrap=False)
    return fig


def draw_all(methods: tuple[str, ...] = tuple(METHODS), ncols: int | None = None):
    """One small panel per method, in a row (or in rows of `ncols`), for comparison; returns the Figure."""
    ncols = ncols or len(methods)
    nrows = -(-len(methods) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 7.6 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < len(methods):
            draw_block(methods[i], ax)
        else:
            ax.axis("off")
    fig.tight_layout()
    return fig
