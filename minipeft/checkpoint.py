"""Files that are never half-written: atomic writes of safetensors and JSON, and one way to save a model.

A crash (or Ctrl-C) in the middle of a write would leave a truncated checkpoint where a good one was.
So every write goes to a temporary file in the same directory, is flushed to disk, and then replaces the
target with `os.replace`, which is atomic on POSIX and Windows: readers see the old file or the new one.
Weights are only ever stored as safetensors, which cannot execute code when loaded (pickles can).

Each write returns what it wrote (`WrittenFile`: the name, the sha256 and the size of the bytes), so a caller
that writes several files can record them in a manifest written last (the adapter format does:
minipeft/tuners/io.py). A process killed in the middle of a write (SIGKILL, an OOM kill, a power cut) runs no
clean-up and leaves its temporary file behind (`.model.safetensors.k3j9x_2a.tmp`); the next write of the
same file removes it (`remove_orphan_temporaries`), so killed saves do not pile up in a directory.

Every trained model is saved through `save_model`, which lets the model say what it is: a GPT writes the
whole network in GPT-2's layout, a PeftModel only its adapters. An output path is checked with
`check_output_dir` before the work that fills it starts, so a bad `--out` costs seconds, not a training run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

# atomic_write's temporary file for `name` is `.{name}.` + 8 characters from [a-z0-9_] + `.tmp`
# (tempfile.mkstemp's prefix, random part and suffix): hidden, beside its target, and never mistaken for it.
_TEMP_SUFFIX = ".tmp"
_TEMP_RANDOM = r"[a-z0-9_]{8}"  # tempfile._RandomNameSequence: 8 of "abcdefghijklmnopqrstuvwxyz0123456789_"


def _temp_prefix(name: str) -> str:
    return f".{name}."


@dataclass(frozen=True)
class WrittenFile:
    """What one atomic write put on disk: the file's name (no directory), the sha256 of its bytes, their count."""

    name: str
    sha256: str
    size: int


def remove_orphan_temporaries(directory: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files that killed writes of `names` left in `directory`; return the paths removed.

    `atomic_write` deletes its temporary file when the write raises, but a process that is killed (SIGKILL, an
    OOM kill, a power cut) runs no clean-up, and `.{name}.<8 random characters>.tmp` stays forever. Only
    regular files whose names match exactly that pattern for one of `names` are removed; nothing else in the
    directory is touched (not other names' temporaries, not files a user named alike by hand: the pattern is
    mkstemp's to the character).

    Two saves of the same file at the same moment are not supported (the last `os.replace` wins): with this
    clean-up the later one can delete the earlier one's temporary file, which then fails loudly in os.replace
    (FileNotFoundError) instead of finishing.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    patterns = [re.compile(re.escape(_temp_prefix(name)) + _TEMP_RANDOM + re.escape(_TEMP_SUFFIX)) for name in names]
    removed = []
    for entry in directory.iterdir():
        if not any(p.fullmatch(entry.name) for p in patterns):
            continue
        try:
            if not stat.S_ISREG(entry.lstat().st_mode):  # a directory or a link named alike is not ours
                continue
            entry.unlink()
        except FileNotFoundError:  # gone already (another save cleaned it up first)
            continue
        removed.append(entry)
    if removed:
        logger.info("removed %d temporary file(s) left by killed saves in %s: %s", len(removed), directory,
                    sorted(p.name for p in removed))
    return removed


def _read_umask() -> int:
    """The process's umask. There is no getter, so it is set and put straight back: done once, when this module
    is imported, so that a save never changes it while other threads create files."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: str | Path, write: Callable[[str], None]) -> WrittenFile:
    """Call write(tmp_path), then move tmp_path over `path` in one step; return the name, sha256 and size of
    the bytes written. Temporary files that killed earlier writes of `path` left are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphan_temporaries(path.parent, [path.name])
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=_TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private (0600); the file gets a new file's usual mode
        write(tmp)
        # Hash the temporary file, in the one read that goes with its fsync, *before* the rename: os.replace
        # moves this very file (it copies nothing), so these are the bytes that `path` will hold. Hashing the
        # final file after the rename would cost the same read but could record another writer's bytes, had
        # one replaced `path` in between.
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
            size = f.tell()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return WrittenFile(path.name, digest.hexdigest(), size)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> WrittenFile:
    """Write tensors (made contiguous, moved to CPU) as one safetensors file, atomically."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # Serialized in memory and written here, not with safetensors' save_file: since safetensors 0.8, save_file
    # itself writes through a temporary file of its own beside its target (`.tmpXXXXXX`), which a killed
    # process would leave behind under a name no clean-up here can safely claim. The cost is one in-memory
    # copy of the file's bytes while it is written.
    data = safetensors_bytes(flat, metadata=metadata)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def save_json(obj, path: str | Path) -> WrittenFile:
    """Write obj as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)


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
    whole network, GPT-2's layout); a PeftModel writes adapter_model.safetensors + adapter_config.json + the
    manifest adapter_manifest.json per adapter ("default" in `directory`, others in `directory/<name>/`), never
    the frozen base. A model wrapped
    in DistributedDataParallel is unwrapped first (`.module`: the wrapper has no save_pretrained). Both write
    through `atomic_write`, so a save also removes what killed saves of the same files left behind."""
    while isinstance(model, DistributedDataParallel):
        model = model.module
    model.save_pretrained(str(directory))
