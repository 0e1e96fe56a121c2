"""Files that are never half-written: atomic writes of safetensors and JSON, and one way to save a model.

A crash (or Ctrl-C) in the middle of `save_file` would leave a truncated checkpoint where a good one was.
So every write goes to a temporary file in the same directory, is flushed to disk, and then replaces the
target with `os.replace`, which is atomic on POSIX and Windows: readers see the old file or the new one.
Weights are only ever stored as safetensors, which cannot execute code when loaded (pickles can).

Every trained model is saved through `save_model`, which lets the model say what it is: a GPT writes the
whole network in GPT-2's layout, a PeftModel only its adapters. An output path is checked with
`check_output_dir` before the work that fills it starts, so a bad `--out` costs seconds, not a training run.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), then move tmp_path over `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None):
    """Write tensors (made contiguous, moved to CPU) as one safetensors file, atomically."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def save_json(obj, path: str | Path) -> None:
    """Write obj as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def check_output_dir(path: str | Path, label: str = "output directory") -> Path:
    """Check, without creating anything, that `path` can become a directory of saved files: it is an existing
    writable directory, or the nearest existing folder above it is a writable directory (so it can be made).
    Raises ValueError naming the path given (as `label`, e.g. "--out") and what is in the way."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{label} {str(path)!r} exists and is not a directory")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the nearest folder that exists: it must hold the ones to be made
    if not existing.is_dir():
        raise ValueError(f"{label} {str(path)!r} cannot be created: {str(existing)!r} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{label} {str(path)!r} cannot be written: {str(existing)!r} is not writable")
    return path


def save_model(model: torch.nn.Module, directory: str | Path) -> None:
    """Save a trained model with its own `save_pretrained`: a GPT writes config.json + model.safetensors (the
    whole network, GPT-2's layout); a PeftModel writes adapter_config.json + adapter_model.safetensors per
    adapter ("default" in `directory`, others in `directory/<name>/`), never the frozen base. A model wrapped
    in DistributedDataParallel is unwrapped first (`.module`: the wrapper has no save_pretrained)."""
    while isinstance(model, DistributedDataParallel):
        model = model.module
    model.save_pretrained(str(directory))
