"""Starting a new run from another run's decoder (``knnformer train ... --init-from RUN``): a run trained here, or
a Llama checkpoint brought in with ``knnformer import-hf``, whose weights become the new model's decoder, so
retrieval (new cross-attention layers, initialised as usual) can be added on top of a model that already exists.
"""

from __future__ import annotations

from pathlib import Path

import torch

from knnformer.run.checkpoint import latest_checkpoint, load_checkpoint


def load_decoder(model: torch.nn.Module, run_dir: str | Path) -> list[str]:
    """Copy the newest checkpoint's decoder weights of ``run_dir`` into ``model``; returns the names ``model``
    keeps from its own initialisation (its retrieval layers). Refused if the decoders differ in shape, or if
    ``model`` lacks a layer the checkpoint has."""
    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    weights = {k: v for k, v in ckpt["weights"].items() if not k.startswith("retrieval.")}
    own = model.state_dict()
    wrong = [k for k, v in weights.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"--init-from {run_dir}: its decoder does not fit this model ({wrong[0]}: "
                         f"{tuple(weights[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}); keep its model section")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith("retrieval.") for k in missing):
        names = unexpected or [k for k in missing if not k.startswith("retrieval.")]
        raise ValueError(f"--init-from {run_dir}: its decoder does not fit this model ({names[0]} differs); "
                         f"keep its model section")
    return missing
