"""The learned NAdamW hyperparameter list of Metz et al. 2020 ("Using a thousand optimization tasks to learn
hyperparameter search strategies"): ``train.optimizer: opt-list:N`` trains with entry N (0-based) of the ordered
list, the entries to try one after another on a new problem. The list is published data (google-research
``opt_list``, Apache-2.0); ``opt_list_nadamw.json`` beside this file holds its first entries with their source.

Each entry fixes NAdamW's hyperparameters and its own learning-rate schedule over the run's ``train.steps``
(``opt_list_lr``): ``train.lr``, ``train.min_lr``, ``train.warmup_steps``, ``train.weight_decay`` and the betas are
not read. ``NAdamW`` is written here from the update's definition (not ported):

    g  = grad + l2 * theta                                   (the gradient of loss + l2 / 2 * |theta|^2)
    m  = beta1 * m + (1 - beta1) * g
    v  = beta2 * v + (1 - beta2) * g^2
    lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t)            (bias correction folded into the rate)
    u  = beta1 * m + (1 - beta1) * g   if use_nesterov else m
    theta -= lr_t * (u / (sqrt(v) + epsilon) + adamw * theta)

``epsilon`` is Adam's "epsilon hat" (added to sqrt(v), not to the bias-corrected sqrt(v_hat)), the form the list
was searched in, so its large epsilons (up to 1e4) mean what they meant there. The L2 term is added to the
gradient as an L2 penalty must be; the published TensorFlow and PyTorch implementations compute
``grad - l2 * theta`` (the gradient of ``loss - l2 / 2 |theta|^2``, which pushes weights away from zero), a flipped
sign that we do not reproduce. Their warmup also differs: TensorFlow's is ``min(warmup_fraction,
constant_fraction)`` of the steps, the PyTorch port's ``max(...)``; we follow TensorFlow (the list's reference,
where the constant phase "includes the time spent warming up").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

DATA = Path(__file__).with_name("opt_list_nadamw.json")


@dataclass(frozen=True)
class OptListEntry:
    name: str
    learning_rate: float
    beta1: float
    beta2: float
    epsilon: float
    use_nesterov: bool
    adamw_weight_decay: float
    l2_weight_decay: float
    warmup_fraction: float
    min_learning_rate_mult: float
    constant_fraction: float


@cache
def opt_list_entries() -> tuple[OptListEntry, ...]:
    """The entries of the list shipped with the package, in the list's order."""
    return tuple(OptListEntry(**e) for e in json.loads(DATA.read_text())["entries"])


def opt_list_entry(index: int) -> OptListEntry:
    entries = opt_list_entries()
    if not 0 <= index < len(entries):
        raise ValueError(f"opt-list:{index}: the list shipped with knnformer holds entries 0..{len(entries) - 1}")
    return entries[index]


def opt_list_lr(step: int, total_steps: int, entry: OptListEntry) -> float:
    """The entry's learning rate at optimizer step ``step`` (0-based) of a run of ``total_steps``: linear warmup
    from 0 over ``total * min(warmup_fraction, constant_fraction)`` steps, constant until ``total *
    constant_fraction``, then a half cosine to ``learning_rate * min_learning_rate_mult`` at ``total``."""
    total = float(total_steps)
    step = min(float(step), total)
    lr, low = entry.learning_rate, entry.learning_rate * entry.min_learning_rate_mult
    if entry.warmup_fraction:
        warmup = total * min(entry.warmup_fraction, entry.constant_fraction)
        if step < warmup:
            return step / warmup * lr
    constant = total * entry.constant_fraction
    if total <= constant:
        return lr
    x = max(step, constant) - constant
    return (lr - low) * (math.cos(x * math.pi / (total - constant)) / 2.0 + 0.5) + low


class NAdamW(torch.optim.Optimizer):
    """NAdamW with the opt_list's fields (see the module's docstring for the update). Each group's ``lr`` is the
    scheduled rate of the step (the trainer sets it); the state is tensors and an int step per parameter."""

    def __init__(self, params, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, epsilon: float = 1e-8,
                 use_nesterov: bool = False, adamw_weight_decay: float = 0.0, l2_weight_decay: float = 0.0):
        if lr < 0 or epsilon < 0 or adamw_weight_decay < 0 or l2_weight_decay < 0:
            raise ValueError("NAdamW: lr, epsilon and the weight decays must be >= 0")
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"NAdamW: beta1 and beta2 must be in [0, 1), got {beta1}, {beta2}")
        defaults = {"lr": lr, "beta1": beta1, "beta2": beta2, "epsilon": epsilon, "use_nesterov": use_nesterov,
                    "adamw_weight_decay": adamw_weight_decay, "l2_weight_decay": l2_weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2, eps = group["beta1"], group["beta2"], group["epsilon"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state: dict[str, Any] = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                g = p.grad
                if group["l2_weight_decay"]:
                    g = g.add(p, alpha=group["l2_weight_decay"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                state["step"] += 1
                t = state["step"]
                lr_t = group["lr"] * math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
                u = m.mul(b1).add_(g, alpha=1.0 - b1) if group["use_nesterov"] else m
                update = u / (v.sqrt() + eps)
                if group["adamw_weight_decay"]:
                    update.add_(p, alpha=group["adamw_weight_decay"])
                p.add_(update, alpha=-lr_t)
        return loss
