"""The optimizer side of training: AdamW with weight decay on matrices only and a learned retriever's own
parameter group (``make_optimizer``), the learning rate of each step, linear warmup then cosine decay
(``lr_at``), and the Performer's random features redrawn every ``redraw_interval`` steps from a generator seeded
by the step, so a resumed run draws the same ones (``redraw_due``, ``redraw_step``).
"""

from __future__ import annotations

import logging
import math

import torch

from knnformer.config import ModelConfig, TrainConfig
from knnformer.model.performer import redraw_features

logger = logging.getLogger(__name__)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine decay to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    decay_steps = cfg.decay_steps or cfg.steps
    if step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, retriever_lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only; fused on devices that support it. A learned retriever's own
    parameters (projection and beta), when there are any, form a third group: learning rate times
    ``retriever_lr_scale`` (each group's ``lr_scale``; the trainer applies it), no weight decay (which would pull
    an identity-initialised projection towards zero)."""
    retriever = {id(p) for n, p in model.named_parameters() if n.startswith("retrieval.retriever.")}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in retriever]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    own = [p for p in model.parameters() if p.requires_grad and id(p) in retriever]
    if own:
        groups.append({"params": own, "weight_decay": 0.0, "lr_scale": retriever_lr_scale})
    # the fused kernel updates each tensor in one pass (CPU and CUDA); elsewhere the foreach path
    fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay + own)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             **({"fused": True} if fused else {"foreach": True}))


def redraw_due(step: int, config: ModelConfig) -> bool:
    """Whether optimizer step ``step`` (0-based) starts with new Performer features (never at step 0, which
    trains on the features drawn at initialisation)."""
    interval = config.performer.redraw_interval
    return config.attention == "performer" and interval > 0 and step > 0 and step % interval == 0


def redraw_step(model: torch.nn.Module, step: int, seed: int) -> None:
    """Draw new Performer features from a generator seeded by the run's seed and the step, so a resumed run draws
    the same ones without keeping a generator state (the current features are saved with the weights)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    layers = redraw_features(model, generator)
    logger.info("step %d: redrew the Performer random features of %d layers", step, layers)
