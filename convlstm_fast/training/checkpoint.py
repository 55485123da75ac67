"""Checkpoints: a directory of safetensors + JSON, written atomically.

Layout of ``OUT/checkpoints/step-00000123/``:

- ``model.safetensors`` — the model's ``state_dict`` (backend-independent: the cells keep the
  SPEC parameter names whatever backend runs them, so a checkpoint loads on every backend);
- ``optimizer.safetensors`` — the optimiser's per-parameter tensors, keyed
  ``"<param index>.<name>"`` (e.g. ``"3.momentum_buffer"``);
- ``meta.json`` — epoch, step, config, metrics history, the optimiser's scalar state
  (``param_groups`` without the parameter lists, non-tensor per-parameter entries), a grad
  scaler's state, and the RNG states (torch CPU/CUDA, Python ``random``, NumPy).

A checkpoint is written into ``step-….tmp-<pid>`` and renamed into place (``os.rename`` of a
directory is atomic on POSIX), then the small pointer file ``OUT/checkpoints/latest`` is replaced
atomically. A kill at any moment leaves either the previous checkpoint or the new one, never a
half-written one; :func:`latest_checkpoint` ignores leftover ``.tmp-`` directories.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
META_FILE = "meta.json"
LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tensor_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous tensors: store independent copies.
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}


def rng_state() -> dict:
    """All RNG states a training step can touch, JSON-serialisable."""
    import numpy as np

    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _split_optimizer_state(optimizer: torch.optim.Optimizer):
    """``optimizer.state_dict()`` -> (tensors for safetensors, JSON-able remainder)."""
    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], scalars: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entries in scalars["state"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": scalars["param_groups"]}


def save_checkpoint(directory, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    meta: dict, scaler=None, keep: int = 2) -> Path:
    """Write a checkpoint for ``meta["step"]`` under ``directory`` atomically; keep the newest
    ``keep`` checkpoints. Returns the checkpoint's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"step-{int(meta['step']):08d}"
    final = directory / name
    temporary = directory / f"{name}.tmp-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    meta = dict(meta)
    meta["rng"] = rng_state()
    save_file(_tensor_dict(model.state_dict()), str(temporary / MODEL_FILE))
    if optimizer is not None:
        tensors, scalars = _split_optimizer_state(optimizer)
        save_file(_tensor_dict(tensors), str(temporary / OPTIMIZER_FILE))
        meta["optimizer"] = scalars
    if scaler is not None and scaler.is_enabled():
        meta["grad_scaler"] = {k: (v.item() if isinstance(v, torch.Tensor) else v)
                               for k, v in scaler.state_dict().items()}
    with open(temporary / META_FILE, "w") as handle:
        json.dump(meta, handle)
        handle.flush()
        os.fsync(handle.fileno())
    for file in (MODEL_FILE, OPTIMIZER_FILE):
        if (temporary / file).exists():
            with open(temporary / file, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(temporary)
    if final.exists():  # the same step saved twice (e.g. end of epoch after a step checkpoint)
        shutil.rmtree(final)
    os.rename(temporary, final)
    pointer = directory / f"{LATEST}.tmp-{os.getpid()}"
    pointer.write_text(name + "\n")
    os.replace(pointer, directory / LATEST)
    _fsync_dir(directory)
    for old in _complete_checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _complete_checkpoints(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("step-*")
                  if p.is_dir() and ".tmp-" not in p.name and (p / META_FILE).is_file())


def latest_checkpoint(directory) -> Path | None:
    """The newest complete checkpoint under ``directory`` (or ``directory`` itself when it is a
    checkpoint), or ``None``."""
    directory = Path(directory)
    if (directory / META_FILE).is_file():
        return directory
    pointer = directory / LATEST
    if pointer.is_file():
        candidate = directory / pointer.read_text().strip()
        if (candidate / META_FILE).is_file():
            return candidate
    complete = _complete_checkpoints(directory) if directory.is_dir() else []
    return complete[-1] if complete else None


def read_meta(checkpoint) -> dict:
    with open(Path(checkpoint) / META_FILE) as handle:
        return json.load(handle)


def load_model_state(checkpoint, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(Path(checkpoint) / MODEL_FILE), device=str(device))


def load_checkpoint(checkpoint, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, scaler=None,
                    restore_rng: bool = True) -> dict:
    """Load weights (and optimiser/scaler/RNG state when given) into place; returns ``meta``."""
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    device = next(model.parameters()).device
    model.load_state_dict(load_model_state(checkpoint, device))
    if optimizer is not None:
        if "optimizer" not in meta:
            raise ValueError(f"checkpoint {checkpoint} holds no optimiser state")
        tensors = load_file(str(checkpoint / OPTIMIZER_FILE), device=str(device))
        optimizer.load_state_dict(_join_optimizer_state(tensors, meta["optimizer"]))
    if scaler is not None and "grad_scaler" in meta:
        scaler.load_state_dict(meta["grad_scaler"])
    if restore_rng:
        set_rng_state(meta["rng"])
    return meta
