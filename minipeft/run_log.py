"""What a training run leaves to look at: RUN/metrics.jsonl, one JSON line per step, and RUN/loss.png.

    {"step": 1, "loss": 3.912, "lr": 0.0001, "tokens_per_second": 5210.4}
    …
    {"step": 50, "loss": 1.204, "lr": 0.0003, "tokens_per_second": 5388.0, "eval_loss": 1.31, "eval_perplexity": 3.71}

`step` counts optimizer steps from 1; `loss` is that step's training loss (the mean over its micro-batches
with gradient accumulation); `lr` the rate it used; `tokens_per_second` the real (non-padding) tokens per
second of training so far, in this process (rank 0 under torchrun, which writes the file); on an evaluation
step the evaluation's metrics follow, prefixed `eval_`. Each line is appended and flushed as the step ends,
so `tail -f RUN/metrics.jsonl` follows a run, and a crash loses at most the line being written. A resumed
run first rewrites the file without the lines after the step it resumes from (atomically), so the file never
holds a step twice. The plot is redrawn, atomically, at each training checkpoint and at the end: training
loss per step, and the evaluation loss where there is one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from minipeft.checkpoint import atomic_write

METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "loss.png"


def _json_number(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null (a diverged loss must not make the file unreadable)."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


class MetricsLog:
    """Appends one line per step to `path`. `keep_through_step`: None starts the file afresh; an int keeps
    the existing lines with step <= it (a resumed run) and drops the rest, including a line torn by a crash."""

    def __init__(self, path: str | Path, keep_through_step: int | None = None) -> None:
        self.path = Path(path)
        kept: list[str] = []
        if keep_through_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # the half-written last line of a killed run
                if isinstance(record, dict) and isinstance(record.get("step"), int) \
                        and record["step"] <= keep_through_step:
                    kept.append(line + "\n")
        text = "".join(kept)

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)

        atomic_write(self.path, write)

    def write(self, record: dict[str, Any]) -> None:
        """Append `record` as one JSON line and flush it to the file."""
        line = json.dumps({k: _json_number(v) for k, v in record.items()})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def plot_losses(path: str | Path, losses: list[float], evals: list[tuple[int, dict]], title: str = "") -> None:
    """Draw the training loss per step (and each evaluation's "loss", if any) to a PNG at `path`, atomically."""
    # here, not at the top: drawing is the only user of matplotlib, a heavy import the training loop need not pay
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(range(1, len(losses) + 1), losses, linewidth=1, label="training loss")
    points = [(step, m["loss"]) for step, m in evals if isinstance(m.get("loss"), (int, float))]
    if points:
        ax.plot(*zip(*points, strict=True), "o-", label="evaluation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
