"""Checkpoints: ``RUN/checkpoints/step-N/`` holding the weights (safetensors), the optimizer state, the RNG
states and the resolved config, with a sha256 of every file so that a corrupt or truncated checkpoint is refused
rather than silently loaded. Each checkpoint is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from knnformer.io import file_sha256, writing_folder

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
        torch.save({"step": step, **(state or {})}, tmp / "state.pt")
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / "checksums.json").write_text(json.dumps({name: file_sha256(tmp / name) for name in files}, indent=2))
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
        "weights": load_file(path / "model.safetensors"),
        "config": json.loads((path / "config.json").read_text()),
        "state": torch.load(path / "state.pt", weights_only=False),
    }
    if with_optimizer and (path / "optimizer.pt").exists():
        out["optimizer"] = torch.load(path / "optimizer.pt", weights_only=False)
    return out


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
