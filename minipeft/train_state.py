"""Training checkpoints: everything the next step depends on, saved as a whole, so a resumed run continues exactly.

What step t+1 computes depends on exactly these, and a checkpoint after step t holds all of them:

    the trainable weights            θ_t            (an adapter's, or the whole model's)
    AdamW's state                    m_t, v_t, t    (the moments and the step count of each parameter)
    the step number                  t              (it fixes the learning rate lr(t) of the schedule)
    the random state                 torch's RNG    (dropout masks), per rank, and the batch generator's
    where the data order is          get_batch's state_dict(), when it has one (EpochBatches: batches drawn)
    the record so far                losses, evaluations, tokens and seconds (so the final record is whole)

Restore them and the run takes the same steps as one that never stopped: the same weights to the last bit on
the same machine with the same number of threads (a CPU kernel's float sums follow its thread count).
The TrainConfig must be the one the checkpoint was made with (`compile`, `compile_backend` and `eval_every`
aside: they change how a step runs, not what it computes); a different one is refused, field by field.

Layout, all safetensors and JSON (nothing is pickled):

    RUN/checkpoints/step-000120/
        trainable.safetensors    parameter name → tensor
        optimizer.safetensors    "<parameter name>/<state key>" → tensor (exp_avg, exp_avg_sq, step)
        random.safetensors       "torch.rank<r>" (and "cuda.rank<r>") → RNG state; "generator" → the batches'
        state.json               step, config, record so far, world size, get_batch's state
    RUN/checkpoints/latest.json  {"step": 120, "directory": "step-000120", "files": {name: sha256, …}}

Each file is written atomically (minipeft.checkpoint), and latest.json last: it is the commit record (as an
adapter's manifest is, minipeft/tuners/io.py). A crash while a checkpoint is written leaves latest.json
naming the previous, complete one; loading checks every file's sha256 against it. After the commit, older
step directories are removed, so a run keeps one checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes

from minipeft.checkpoint import save_json, save_safetensors

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
STATE_VERSION = 1
# TrainConfig fields that change how a step runs, not what it computes: free to differ on resume
NOT_PART_OF_THE_RUN = ("compile", "compile_backend", "eval_every")
_STEP_DIR = re.compile(r"step-\d{6,}")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """RUN/checkpoints/latest.json if a checkpoint was committed there, else None."""
    path = Path(run_dir) / CHECKPOINTS / LATEST
    return path if path.is_file() else None


def _optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state keyed by parameter name, not by the optimizer's position index."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            out[f"{names[id(p)]}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def save_train_state(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     random_state: dict[str, torch.Tensor], config: dict[str, Any], record: dict[str, Any],
                     batches_state: dict[str, Any] | None, world_size: int) -> Path:
    """Write the checkpoint after `step` (1-based count of steps done) and commit it; returns its directory.

    random_state: {"torch.rank0": …, "generator": …} as `train` gathers it; config: the TrainConfig as a dict;
    record: {"losses", "evals", "tokens", "seconds"} so far; batches_state: get_batch.state_dict() or None.
    """
    root = Path(run_dir) / CHECKPOINTS
    name = f"step-{step:06d}"
    directory = root / name
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    written = [
        save_safetensors(trainable, directory / "trainable.safetensors"),
        save_safetensors(_optimizer_tensors(model, optimizer), directory / "optimizer.safetensors"),
        save_safetensors(random_state, directory / "random.safetensors"),
        save_json({"state_version": STATE_VERSION, "step": step, "config": config, "record": record,
                   "batches": batches_state, "world_size": world_size}, directory / "state.json"),
    ]
    save_json({"step": step, "directory": name, "files": {f.name: f.sha256 for f in written}}, root / LATEST)
    for old in root.iterdir():  # after the commit: the older checkpoints are no longer needed
        if old.is_dir() and _STEP_DIR.fullmatch(old.name) and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return directory


def _read_committed(run_dir: Path) -> tuple[Path, dict[str, bytes]]:
    """The committed checkpoint's directory and its files' bytes, each checked against latest.json's sha256."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise ValueError(f"no checkpoint to resume from in {str(run_dir)!r} (no {CHECKPOINTS}/{LATEST}); a run saves "
                         "one every `save_every` steps")
    try:
        commit = json.loads(latest.read_text(encoding="utf-8"))
        directory, files = latest.parent / commit["directory"], dict(commit["files"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{latest} is not a checkpoint record: {e}") from e
    data = {}
    for file_name, sha256 in files.items():
        path = directory / file_name
        try:
            data[file_name] = path.read_bytes()
        except OSError as e:
            raise ValueError(f"checkpoint file {path} cannot be read: {e}") from e
        if hashlib.sha256(data[file_name]).hexdigest() != sha256:
            raise ValueError(f"checkpoint file {path} does not match {latest} (it changed after the checkpoint was "
                             "committed); it cannot be resumed from")
    return directory, data


def _check_config(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    keys = (set(saved) | set(current)) - set(NOT_PART_OF_THE_RUN)
    differ = {k: (saved.get(k), current.get(k)) for k in sorted(keys) if saved.get(k) != current.get(k)}
    if differ:
        shown = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in differ.items())
        raise ValueError(f"the checkpoint in {where} was made with another training configuration ({shown}); resume "
                         "with the same settings, or start a new run")


def load_train_state(run_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     config: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Load the committed checkpoint of `run_dir` into `model`'s trainable parameters and `optimizer`, after
    checking that it is whole, made with the same config and world size, and for the same trainable parameters.

    Returns {"step", "record", "batches", "random"}: the steps done, the record so far, get_batch's state and the
    random states (tensors), which the caller restores (it knows its rank and its generator).
    """
    directory, data = _read_committed(Path(run_dir))
    state = json.loads(data["state.json"])
    if state.get("state_version") != STATE_VERSION:
        raise ValueError(f"{directory}/state.json has state_version {state.get('state_version')!r}; this minipeft "
                         f"reads {STATE_VERSION}")
    _check_config(state["config"], config, directory)
    if state["world_size"] != world_size:
        raise ValueError(f"the checkpoint in {directory} was made by {state['world_size']} process(es); resume with "
                         f"the same number (now {world_size})")
    trainable = load_safetensors_bytes(data["trainable.safetensors"])
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != set(params):
        missing, extra = sorted(set(params) - set(trainable)), sorted(set(trainable) - set(params))
        raise ValueError(f"the checkpoint in {directory} is for other trainable parameters (the model has "
                         f"{missing[:3]} that it lacks, it has {extra[:3]} that the model lacks): same method and "
                         "options as the run that made it?")
    for name, p in params.items():
        if trainable[name].shape != p.shape:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(trainable[name].shape)}, the model's "
                             f"parameter {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(trainable[name])
    saved = load_safetensors_bytes(data["optimizer.safetensors"])
    by_name = {n: p for n, p in model.named_parameters()}
    order = [p for group in optimizer.param_groups for p in group["params"]]  # the optimizer's own indices
    index = {id(p): i for i, p in enumerate(order)}
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in saved.items():
        name, _, slot = key.rpartition("/")
        opt_state.setdefault(index[id(by_name[name])], {})[slot] = value
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": opt_state, "param_groups": current["param_groups"]})
    return {"step": state["step"], "record": state["record"], "batches": state["batches"],
            "random": load_safetensors_bytes(data["random.safetensors"])}
