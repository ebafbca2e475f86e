"""Checkpoints: ``RUN/checkpoints/step-N/`` holding the weights (safetensors), the optimizer state, the RNG
states and the resolved config, with a sha256 of every file so that a corrupt or truncated checkpoint is refused
rather than silently loaded. Each checkpoint is written to a temporary folder and renamed into place.

No code runs from a checkpoint: the trainer's state (step, generator and RNG states) is ``state.json`` with its
tensors in ``state.safetensors`` (``pack_state``), and every torch file (``optimizer.pt``, and ``state.pt`` of
checkpoints written before) is read with ``torch.load(weights_only=True)``, whose unpickler builds tensors and
plain containers only. An old ``state.pt``'s numpy RNG arrays are let through that unpickler by name and nothing
else, so a planted pickle is refused, never run. The checksums sit beside the files, so they catch corruption,
not tampering; refusing to unpickle is what stops tampering.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from knnformer.io import file_sha256, tmp_path, writing_folder

STEP_DIR = re.compile(r"^step-(\d+)$")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path:
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise ValueError(f"{run_dir} has no checkpoint; train one with `knnformer train DATASTORE --out {run_dir}`")
    return ckpts[-1]


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, config: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None, state: dict[str, Any] | None = None,
                    keep: int = 2) -> Path:
    """Write ``step-N`` atomically and delete all but the ``keep`` newest checkpoints."""
    final = Path(run_dir) / "checkpoints" / f"step-{step:07d}"
    with writing_folder(final) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        save_state(tmp, {"step": step, **(state or {})})
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / "checksums.json").write_text(json.dumps({name: file_sha256(tmp / name) for name in files}, indent=2))
    prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints. Each is renamed out of sight first, so a kill mid-delete
    leaves a dead temporary (removed by the next writer), never a half-deleted ``step-N``."""
    for old in list_checkpoints(run_dir)[:-keep]:
        doomed = tmp_path(old)
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def verify_checkpoint(path: Path) -> None:
    sums_path = path / "checksums.json"
    try:
        sums = json.loads(sums_path.read_text())
    except (OSError, json.JSONDecodeError):
        raise ValueError(f"checkpoint {path} is incomplete (no readable checksums.json); "
                         f"delete it to fall back to an older one") from None
    for name, digest in sums.items():
        file = path / name
        if not file.is_file() or file_sha256(file) != digest:
            raise ValueError(f"checkpoint {path} is corrupt or truncated ({name} does not match its checksum); "
                             f"delete it to fall back to an older one, or retrain")


def load_checkpoint(path: str | Path, with_optimizer: bool = False) -> dict[str, Any]:
    """Return ``{"weights", "config", "state", "optimizer"?}`` after checking every file's sha256."""
    path = Path(path)
    verify_checkpoint(path)
    out = {
        "path": path,
        "weights": _read(path / "model.safetensors", load_file),
        "config": _read(path / "config.json", lambda p: json.loads(p.read_text())),
        "state": load_state(path),
    }
    if with_optimizer and (path / "optimizer.pt").exists():
        out["optimizer"] = safe_torch_load(path / "optimizer.pt")
    return out


# ---------------------------------------------------------------- trainer state without pickles

STATE_JSON, STATE_TENSORS, OLD_STATE = "state.json", "state.safetensors", "state.pt"


def pack_state(value: Any, tensors: dict[str, torch.Tensor], key: str = "s") -> Any:
    """``value`` as JSON, its tensors and numpy arrays moved into ``tensors`` (named by their place) and its
    tuples marked, so that ``unpack_state`` rebuilds it exactly (RNG states are tuples of ints and arrays)."""
    import numpy as np

    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value).view(np.int32) if value.dtype == np.uint32
                                        else np.ascontiguousarray(value))
        return {"__ndarray__": key, "dtype": value.dtype.str}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"checkpoint state keys must be strings: {list(value)[:5]}")
        return {k: pack_state(v, tensors, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, tuple):
        return {"__tuple__": [pack_state(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [pack_state(v, tensors, f"{key}.{i}") for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint state cannot hold a {type(value).__name__} (only tensors, arrays and JSON values)")


def unpack_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    import numpy as np

    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__ndarray__" in value:
            dtype = np.dtype(value["dtype"])
            array = tensors[value["__ndarray__"]].numpy()
            return array.view(dtype) if dtype == np.uint32 else array.astype(dtype, copy=False)
        if "__tuple__" in value:
            return tuple(unpack_state(v, tensors) for v in value["__tuple__"])
        return {k: unpack_state(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [unpack_state(v, tensors) for v in value]
    return value


def save_state(folder: Path, state: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    packed = pack_state(state, tensors)
    save_file(tensors, folder / STATE_TENSORS)
    (folder / STATE_JSON).write_text(json.dumps(packed))


def load_state(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint ``path``: ``state.json`` and ``state.safetensors``, or the ``state.pt`` of
    a checkpoint written before (read without running code; see the module docstring)."""
    if (path / STATE_JSON).is_file():
        packed = _read(path / STATE_JSON, lambda p: json.loads(p.read_text()))
        tensors = _read(path / STATE_TENSORS, load_file) if (path / STATE_TENSORS).is_file() else {}
        try:
            return unpack_state(packed, tensors)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path / STATE_JSON} does not match {STATE_TENSORS} ({e}); delete the checkpoint "
                             "to fall back to an older one") from None
    if (path / OLD_STATE).is_file():
        import numpy as np

        allowed = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
        with torch.serialization.safe_globals(allowed):
            return safe_torch_load(path / OLD_STATE)
    raise ValueError(f"checkpoint {path} has no state.json; delete it to fall back to an older one")


def safe_torch_load(file: Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers, never code. A file that needs more (a
    pickle naming other functions or classes) is refused with a one-line error naming it."""
    import pickle

    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{file} is not plain tensors and was refused, not loaded (a pickle can run code: {first[:160]}"
                         f"); delete the checkpoint, or retrain") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{file} is unreadable ({_first_line(e)}); delete the checkpoint to fall back to an "
                         "older one") from None


def _read(file: Path, reader) -> Any:
    """``reader(file)``, any failure turned into a one-line error naming the file."""
    try:
        return reader(file)
    except FileNotFoundError:
        raise ValueError(f"checkpoint file {file} is missing; delete the checkpoint to fall back to an older one") \
            from None
    except (OSError, ValueError, SafetensorError) as e:  # json's errors are ValueErrors
        raise ValueError(f"{file} is unreadable ({_first_line(e)}); delete the checkpoint to fall back to an "
                         "older one") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:160]


def load_weights(model: torch.nn.Module, ckpt: dict[str, Any]) -> None:
    """Load a checkpoint's weights into ``model``, refusing (one line) weights of another model shape."""
    try:
        model.load_state_dict(ckpt["weights"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {ckpt['path']} holds a model of another shape than this config "
                         f"({_first_line(e).removeprefix('Error(s) in loading state_dict for ')}); resume without "
                         "changing model.* settings, or train a new run with another --out") from None


def load_optimizer(optimizer: torch.optim.Optimizer, ckpt: dict[str, Any]) -> None:
    """Load a checkpoint's optimizer state, refusing (one line) one of another optimizer or model."""
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{ckpt['path']}/optimizer.pt does not fit this run's optimizer ({_first_line(e)}); resume "
                         "with the run's own train.* optimizer settings") from None


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
