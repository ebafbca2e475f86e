"""Mixture-of-Experts feed-forward: a router sends each token to a few of E SwiGLU experts (GShard, Switch,
expert choice), the experts run as one batched matmul over a padded buffer, and their outputs are combined by
the gates. Tokens an expert has no room for get no output here and pass through the residual unchanged.

Shape legend:
    B  batch          T  sequence length       N  tokens (B * T)        D  model width
    E  experts        F  expert hidden width   k  choices per token (1 or 2)
    A  assignments (N * k, choice-major: every token's first choice, then every token's second)
    Cap  expert capacity (tokens per expert)

Dispatch: the assignments are stably sorted by expert, so an assignment's rank within its expert is its slot
(first choices before second choices, earlier tokens before later ones, as GShard's cumsum gives); those with a
slot below Cap are kept. On CPU the kept rows, grouped by expert, run through two grouped GEMMs
(``torch._grouped_mm``, no padding); elsewhere they are copied into an (E, Cap, D) buffer and run as two
``torch.bmm``. The outputs are scaled by their gates and summed back per token with ``index_add``. No Python loop
over tokens or experts. Measured on 1 CPU thread (8 experts, D=128, F=176, 3,000 of 5,120 padded rows used, as
top-2 with its sampled second expert gives): forward + backward of the experts 14.7 ms grouped vs 26-31 ms
padded. At equal shapes, grouped is ~10% slower than bmm, so expert choice, whose buffer is exact, uses bmm.

Each forward keeps on the module what the trainer and ``evaluate`` read: ``aux_loss`` (the weighted
load-balancing and z-losses, differentiable) and ``stats`` (detached: expert load, dropped share, losses).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from knnformer.config import ModelConfig


def balance_loss(probs: torch.Tensor, first_choice: torch.Tensor) -> torch.Tensor:
    """GShard's auxiliary loss E * sum_e f_e * P_e for router probabilities (N, E) and each token's first
    expert (N,): f_e is the share of tokens whose first choice is e (not differentiable), P_e the mean probability
    of e. It is 1 for a uniform router; for a router that gives every token the same probabilities p it is
    E * max(p) >= 1, with equality only for uniform p. Its gradient lowers the probability of over-chosen
    experts."""
    E = probs.shape[-1]
    f = torch.bincount(first_choice, minlength=E).to(probs.dtype) / first_choice.numel()
    return E * (f * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean squared logsumexp of the router logits (N, E)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def capacity(num_tokens: int, num_experts: int, factor: float, k: int) -> int:
    """Slots per expert: ceil(factor * k * tokens / E), at least 1 and at most the tokens."""
    return max(1, min(num_tokens, math.ceil(factor * k * num_tokens / num_experts)))


def token_choice(probs: torch.Tensor, k: int, sample_second: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing of probabilities (N, E): experts (N, k), gates (N, k) and whether each choice is taken
    (N, k). Top-2 gates are normalised over the two (GShard); with ``sample_second`` the second is taken with
    probability 2 * its gate (<= 1), else dropped with its gate unchanged. Top-1 keeps the raw probability
    (Switch), so the router gets a gradient from the expert's output."""
    gates, experts = probs.topk(k, dim=-1)  # (N, k) each
    if k == 2:
        gates = gates / gates.sum(-1, keepdim=True).clamp_min(1e-9)
    taken = torch.ones_like(experts, dtype=torch.bool)
    if k == 2 and sample_second:
        taken[:, 1] = torch.rand(gates.shape[0], device=gates.device) < 2 * gates[:, 1].detach()
    return experts, gates, taken


def expert_choice(probs: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert-choice routing of probabilities (N, E): each expert's ``cap`` highest-scoring tokens (E, Cap) and
    their gates (E, Cap). A token may be taken by several experts or by none."""
    gates, token_of = probs.t().topk(cap, dim=-1)
    return token_of, gates


def slots(experts: torch.Tensor, taken: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Each assignment's slot in its expert, (A,) for flat choice-major ``experts`` and ``taken`` (A,): its rank
    among the taken assignments of the same expert. Assignments not taken get a slot no capacity reaches."""
    A = experts.numel()
    key = torch.where(taken, experts, num_experts)  # not taken: sorted after every expert
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)
    starts = counts.cumsum(0) - counts
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(A, device=experts.device) - starts[key[order]]
    return torch.where(taken, ranks, A)


class MoE(nn.Module):
    """E SwiGLU experts with stacked weights (E, D, 2F) and (E, F, D), and a linear router (E, D)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.cfg = config.moe
        E, D = self.cfg.num_experts, config.dim
        F_ = self.cfg.expert_hidden or config.resolved_ffn_hidden()
        self.router = nn.Linear(D, E, bias=False)
        # the same layout as SwiGLU's gate_up and down weights, transposed: x @ gate_up gives (gate | up)
        self.experts_gate_up = nn.Parameter(torch.empty(E, D, 2 * F_))
        self.experts_down = nn.Parameter(torch.empty(E, F_, D))
        self.dropout = config.dropout
        # expert parallelism: set by train/parallel.shard_experts, which leaves this layer E / ranks experts; a
        # callable (kept rows grouped by global expert, each expert's row count) -> their outputs, in that order
        self.exchange = None
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}

    def run_experts(self, buffer: torch.Tensor) -> torch.Tensor:
        """Every expert's SwiGLU on its rows of ``buffer`` (E, Cap, D) -> (E, Cap, D)."""
        gate, up = torch.bmm(buffer, self.experts_gate_up).chunk(2, dim=-1)  # (E, Cap, F) each
        return torch.bmm(F.silu(gate) * up, self.experts_down)

    def run_experts_grouped(self, rows: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Every expert's SwiGLU on ``rows`` (R, D) grouped by expert, expert e's rows ending at ``ends[e]`` (E,)
        -> (R, D), with grouped GEMMs. Under autocast, in its dtype (autocast does not cover the op)."""
        w1, w2 = self.experts_gate_up, self.experts_down
        if torch.is_autocast_enabled(rows.device.type):
            dtype = torch.get_autocast_dtype(rows.device.type)
            rows, w1, w2 = rows.to(dtype), w1.to(dtype), w2.to(dtype)
        ends = ends.to(torch.int32)
        gate, up = torch._grouped_mm(rows, w1, offs=ends).chunk(2, dim=-1)  # (R, F) each
        return torch._grouped_mm((F.silu(gate) * up).contiguous(), w2, offs=ends)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits and probabilities (N, E) in fp32, with Switch's jitter on the input in training."""
        if self.training and self.cfg.router_noise > 0:
            eps = self.cfg.router_noise
            x = x * torch.empty_like(x).uniform_(1 - eps, 1 + eps)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.router.weight.float())
        return logits, logits.softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        tokens = x.reshape(-1, D)  # (N, D)
        logits, probs = self.route(tokens)
        factor = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        if self.cfg.router == "expert_choice":
            out, load, dropped, first = self.expert_choice_forward(tokens, probs, factor or self.cfg.capacity_factor)
        else:
            out, load, dropped, first = self.token_choice_forward(tokens, probs, factor)
        balance = balance_loss(probs, first)
        z = z_loss(logits)
        # expert choice is balanced by construction: its balance loss is reported, not trained on
        balance_weight = 0.0 if self.cfg.router == "expert_choice" else self.cfg.aux_loss_weight
        self.aux_loss = balance_weight * balance + self.cfg.z_loss_weight * z
        self.stats = {"load": load.detach(), "dropped": dropped.detach(), "balance_loss": balance.detach(),
                      "z_loss": z.detach()}
        return F.dropout(out.view(B, T, D).to(x.dtype), self.dropout, self.training)

    def token_choice_forward(self, tokens: torch.Tensor, probs: torch.Tensor, factor: float):
        """GShard top-2 or Switch top-1 with capacity ``factor`` (0: no drops). Returns the output (N, D), each
        expert's share of the router's assignments (E,), the share of tokens no expert took, and first choices."""
        N, D = tokens.shape
        E = self.cfg.num_experts
        k = 2 if self.cfg.router == "top2" else 1
        experts, gates, taken = token_choice(probs, k, self.training and self.cfg.second_expert_sampling)
        flat_experts, flat_taken = experts.t().reshape(-1), taken.t().reshape(-1)  # (A,) choice-major
        slot = slots(flat_experts, flat_taken, E)
        counts = torch.bincount(flat_experts[flat_taken], minlength=E)
        busiest = int(counts.max())  # pad only to the busiest expert's load when that is below capacity
        cap = max(1, min(busiest, capacity(N, E, factor, k))) if factor > 0 else max(1, busiest)
        kept = slot < cap  # (A,)
        token_of = torch.arange(N, device=tokens.device).repeat(k)[kept]  # (kept,)
        gate_of = gates.t().reshape(-1)[kept, None]  # (kept, 1)
        # under torch.compile the padded path: torch 2.13's fake kernel of _grouped_mm refuses fp32
        grouped = self.cfg.grouped_mm and tokens.device.type == "cpu" and not torch.compiler.is_compiling()
        if (grouped and hasattr(torch, "_grouped_mm")) or self.exchange is not None:
            # expert e's kept slots are 0 .. min(count_e, Cap) - 1: row = e's first row + slot
            ends = counts.clamp(max=cap).cumsum(0)
            row = ends[flat_experts[kept]] - counts.clamp(max=cap)[flat_experts[kept]] + slot[kept]
            order = torch.empty_like(token_of).index_copy_(0, row, torch.arange(len(row), device=row.device))
            rows = tokens[token_of[order]]  # in expert order
            expert_out = (self.run_experts_grouped(rows, ends) if self.exchange is None
                          else self.exchange(rows, counts.clamp(max=cap)))
            weighted = expert_out * gate_of[order].to(expert_out.dtype)
            out = weighted.new_zeros(N, D).index_add(0, token_of[order], weighted)
        else:
            index = flat_experts[kept] * cap + slot[kept]  # row of the (E * Cap) buffer
            buffer = tokens.new_zeros(E * cap, D).index_copy(0, index, tokens[token_of])
            expert_out = self.run_experts(buffer.view(E, cap, D)).view(E * cap, D)
            weighted = expert_out[index] * gate_of.to(expert_out.dtype)
            out = weighted.new_zeros(N, D).index_add(0, token_of, weighted)
        served = torch.zeros(N, dtype=torch.bool, device=tokens.device)
        served[token_of] = True
        dropped = 1.0 - served.float().mean()
        return out, counts.float() / counts.sum().clamp_min(1), dropped, experts[:, 0]

    def expert_choice_forward(self, tokens: torch.Tensor, probs: torch.Tensor, factor: float):
        """Expert choice: each expert takes the ``capacity`` tokens it scores highest, weighted by that score.
        Returns as ``token_choice``; the load is even by construction and "dropped" counts the tokens that no
        expert took."""
        N, D = tokens.shape
        E = self.cfg.num_experts
        token_of, gates = expert_choice(probs, capacity(N, E, factor, 1))  # (E, Cap) each
        cap = token_of.shape[1]
        buffer = tokens[token_of.reshape(-1)].view(E, cap, D)
        expert_out = self.run_experts(buffer).view(E * cap, D)
        weighted = expert_out * gates.reshape(-1, 1).to(expert_out.dtype)
        out = weighted.new_zeros(N, D).index_add(0, token_of.reshape(-1), weighted)
        served = torch.zeros(N, dtype=torch.bool, device=tokens.device)
        served[token_of.reshape(-1)] = True
        load = torch.full((E,), 1.0 / E, device=tokens.device)
        return out, load, 1.0 - served.float().mean(), probs.argmax(-1)


def moe_layers(model: nn.Module) -> list[tuple[int, MoE]]:
    """(block index, MoE layer) of a Transformer's MoE blocks."""
    return [(i, block.ffn) for i, block in enumerate(model.blocks) if isinstance(block.ffn, MoE)]


class StatsMeter:
    """Averages the MoE layers' ``stats`` over the forwards since the last ``reset`` (micro-batches of a step,
    or every batch of an evaluation), through forward hooks; ``close`` removes the hooks."""

    def __init__(self, model: nn.Module):
        self.layers = moe_layers(model)
        self.sums: dict[int, dict[str, torch.Tensor]] = {}
        self.counts: dict[int, int] = {}
        self.hooks = [layer.register_forward_hook(self._hook(i)) for i, layer in self.layers]

    def _hook(self, index: int):
        def hook(module, inputs, output):
            sums = self.sums.setdefault(index, {})
            for key, value in module.stats.items():
                sums[key] = sums[key] + value if key in sums else value.clone()
            self.counts[index] = self.counts.get(index, 0) + 1

        return hook

    def reset(self) -> None:
        self.sums, self.counts = {}, {}

    def summary(self) -> list[dict]:
        """Per MoE layer: ``layer``, expert ``load`` (shares summing to 1), ``dropped`` share of tokens,
        ``balance_loss`` and ``z_loss`` (unweighted), each the mean over the forwards seen."""
        out = []
        for i, _ in self.layers:
            if i not in self.counts:
                continue
            mean = {key: value / self.counts[i] for key, value in self.sums[i].items()}
            out.append({"layer": i, "load": [round(v, 4) for v in mean["load"].tolist()],
                        "dropped": float(mean["dropped"]), "balance_loss": float(mean["balance_loss"]),
                        "z_loss": float(mean["z_loss"])})
        return out

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
