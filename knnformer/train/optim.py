"""The optimizer side of training: ``train.optimizer`` (``make_optimizer``) is AdamW with weight decay on matrices
only and a learned retriever's own parameter group; or Muon (torch's), SOAP or Shampoo (pytorch-optimizer's) for
the hidden weight matrices with that AdamW for the rest; or entry N of the learned NAdamW list (``opt-list:N``,
opt_list.py). Then the learning rate of each step, linear warmup then cosine decay, or an opt-list entry's own
schedule (``lr_at``), and the Performer's random features redrawn every ``redraw_interval`` steps from a
generator seeded by the step, so a resumed run draws the same ones (``redraw_due``, ``redraw_step``).
"""

from __future__ import annotations

import logging
import math

import torch

from knnformer.config import ModelConfig, TrainConfig, parse_optimizer
from knnformer.model.performer import redraw_features
from knnformer.train.opt_list import NAdamW, opt_list_entry, opt_list_lr

logger = logging.getLogger(__name__)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine decay to ``min_lr``; for
    ``opt-list:N``, entry N's own schedule over ``steps``."""
    kind, index = parse_optimizer(cfg.optimizer)
    if kind == "opt-list":
        return opt_list_lr(step, cfg.steps, opt_list_entry(index))
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    decay_steps = cfg.decay_steps or cfg.steps
    if step >= decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


class CombinedOptimizer:
    """Several optimizers that step as one, each over its own parameters: what ``make_optimizer`` returns for Muon,
    SOAP and Shampoo (the matrix optimizer, then AdamW for the rest). ``param_groups`` lists every optimizer's
    groups (the trainer sets their ``lr``); the state dict holds each optimizer's own, by name."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(f"optimizer state holds {sorted(state)}, this run's optimizer is {sorted(self.optimizers)}"
                             f": was the checkpoint trained with another train.optimizer?")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, retriever_lr_scale: float = 1.0):
    """The optimizer ``cfg.optimizer`` names. ``adamw``: AdamW with weight decay on matrices only; fused on devices
    that support it. A learned retriever's own parameters (projection and beta), when there are any, form a third
    group: learning rate times ``retriever_lr_scale`` (each group's ``lr_scale``; the trainer applies it), no weight
    decay (which would pull an identity-initialised projection towards zero).

    ``muon``, ``soap``, ``shampoo``: the hidden weight matrices (2-D, not the embedding, which is also the tied
    head) go to that optimizer with weight decay ``cfg.weight_decay``; everything else (embedding, norms, 3-D
    expert and bias tensors, the retriever's group) to the AdamW above. Muon's rate is scaled to match AdamW's
    update RMS (``adjust_lr_fn="match_rms_adamw"``), so one ``train.lr`` serves both. ``opt-list:N``: NAdamW with
    entry N's hyperparameters, its weight decays on matrices only, no decay on norms or the retriever's group."""
    kind, index = parse_optimizer(cfg.optimizer)
    retriever = {id(p) for n, p in model.named_parameters() if n.startswith("retrieval.retriever.")}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in retriever]
    own = [p for p in model.parameters() if p.requires_grad and id(p) in retriever]
    if kind == "opt-list":
        e = opt_list_entry(index)
        hyper = {"beta1": e.beta1, "beta2": e.beta2, "epsilon": e.epsilon, "use_nesterov": e.use_nesterov}
        groups = [{"params": [p for _, p in named if p.dim() >= 2], "adamw_weight_decay": e.adamw_weight_decay,
                   "l2_weight_decay": e.l2_weight_decay, "lr_scale": 1.0},
                  {"params": [p for _, p in named if p.dim() < 2], "lr_scale": 1.0}]
        if own:
            groups.append({"params": own, "lr_scale": retriever_lr_scale})
        return NAdamW(groups, lr=e.learning_rate, **hyper)
    matrices = []
    if kind != "adamw":
        matrices = [p for n, p in named if p.dim() == 2 and not n.startswith("embed.")]
    taken = {id(p) for p in matrices}
    params = [p for _, p in named if id(p) not in taken]
    adamw = _adamw(params, own, cfg, retriever_lr_scale)
    if kind == "adamw":
        return adamw
    group = [{"params": matrices, "lr_scale": 1.0}]
    if kind == "muon":
        matrix_opt = torch.optim.Muon(group, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.95,
                                      nesterov=True, adjust_lr_fn="match_rms_adamw")
    elif kind == "soap":
        from pytorch_optimizer import SOAP

        matrix_opt = SOAP(group, lr=cfg.lr, weight_decay=cfg.weight_decay, precondition_frequency=10)
    else:  # shampoo: the plain Shampoo (its state is tensors only, unlike ScalableShampoo's preconditioner
        # objects); no momentum (its momentum mixes the raw gradient into the last preconditioned update, which is
        # preconditioned again); preconditioners recomputed every 10 steps
        from pytorch_optimizer import Shampoo

        matrix_opt = Shampoo(group, lr=cfg.lr, momentum=0.0, weight_decay=cfg.weight_decay,
                             weight_decouple=True, preconditioning_compute_steps=10)
    return CombinedOptimizer({kind: matrix_opt, "adamw": adamw})


def _adamw(params: list[torch.Tensor], own: list[torch.Tensor], cfg: TrainConfig,
           retriever_lr_scale: float) -> torch.optim.AdamW:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
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
