"""train.optimizer: AdamW, Muon, SOAP, Shampoo and the learned NAdamW list (opt-list:N); exact resume for each."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from knnformer.config import load_config
from knnformer.model.transformer import Transformer
from knnformer.run.checkpoint import list_checkpoints
from knnformer.train.opt_list import NAdamW, OptListEntry, opt_list_entries, opt_list_lr
from knnformer.train.optim import CombinedOptimizer, lr_at, make_optimizer
from knnformer.train.trainer import train

OPTIMIZERS = ["adamw", "muon", "soap", "shampoo", "opt-list:0", "opt-list:1"]


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def hand_nadamw(theta, grads, lr, b1, b2, eps, nesterov, adamw, l2):
    """NAdamW on one scalar with Python floats, step by step as the paper defines it."""
    m = v = 0.0
    for t, g in enumerate(grads, start=1):
        g = g + l2 * theta
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        lr_t = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        u = b1 * m + (1 - b1) * g if nesterov else m
        theta = theta - lr_t * (u / (math.sqrt(v) + eps) + adamw * theta)
    return theta


@pytest.mark.parametrize("nesterov", [False, True])
def test_nadamw_updates_match_a_hand_computation(nesterov):
    theta0, grads = [0.5, -1.25], [[0.3, -0.2], [0.1, 0.4], [-0.25, 0.05]]
    hyper = {"lr": 0.01, "beta1": 0.8, "beta2": 0.95, "epsilon": 1e-3, "use_nesterov": nesterov,
             "adamw_weight_decay": 0.1, "l2_weight_decay": 0.05}
    p = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    opt = NAdamW([p], **hyper)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    for i in range(2):
        expected = hand_nadamw(theta0[i], [g[i] for g in grads], 0.01, 0.8, 0.95, 1e-3, nesterov, 0.1, 0.05)
        assert p[i].item() == pytest.approx(expected, rel=1e-12)


def test_nadamw_l2_term_pulls_weights_towards_zero():
    """The paper's L2 term is the gradient of + l2/2 |theta|^2; the published code's ``grad - l2 * theta`` would
    push a weight with zero loss gradient away from zero."""
    p = torch.nn.Parameter(torch.tensor([2.0, -3.0]))
    opt = NAdamW([p], lr=0.1, l2_weight_decay=0.5)
    for _ in range(5):
        p.grad = torch.zeros(2)
        opt.step()
    assert p[0].item() < 2.0 and p[1].item() > -3.0


def test_opt_list_data_and_schedule():
    entries = opt_list_entries()
    assert len(entries) == 13 and entries[0].name == "nadamw_grid_seed251" and entries[9].name == "nadamw_grid_seed743"
    data = json.loads((__import__("knnformer.train.opt_list", fromlist=["DATA"]).DATA).read_text())
    assert "Apache-2.0" in data["license"] and "google-research" in data["source"]["repository"]
    e = OptListEntry("x", 1.0, 0.9, 0.99, 1e-8, False, 0.0, 0.0, warmup_fraction=0.1, min_learning_rate_mult=0.2,
                     constant_fraction=0.5)
    assert opt_list_lr(0, 100, e) == 0.0  # warmup from 0
    assert opt_list_lr(5, 100, e) == pytest.approx(0.5)
    assert opt_list_lr(10, 100, e) == opt_list_lr(50, 100, e) == 1.0  # constant phase
    assert opt_list_lr(75, 100, e) == pytest.approx(0.6)  # half way down the cosine: (1 + 0.2) / 2
    assert opt_list_lr(100, 100, e) == pytest.approx(0.2)
    cfg = load_config("tiny", ["train.optimizer=opt-list:0"]).train
    assert lr_at(0, cfg) == pytest.approx(entries[0].learning_rate)  # no warmup in entry 0


def test_matrix_optimizers_take_the_hidden_matrices_only(tiny_config):
    tiny_config.train.optimizer = "muon"
    model = Transformer(tiny_config.model, tiny_config.retrieval)
    opt = make_optimizer(model, tiny_config.train)
    assert isinstance(opt, CombinedOptimizer) and list(opt.optimizers) == ["muon", "adamw"]
    muon = {id(p) for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert "embed.weight" not in names and "blocks.0.attn.qkv.weight" in names
    assert all(p.dim() == 2 for n, p in model.named_parameters() if n in names)
    adamw = {id(p) for g in opt.optimizers["adamw"].param_groups for p in g["params"]}
    assert adamw | muon == {id(p) for p in model.parameters()} and not adamw & muon


@pytest.mark.parametrize("bad", ["sgd", "opt-list", "opt-list:x", "opt-list:-1"])
def test_unknown_optimizer_is_refused(bad):
    with pytest.raises(ValueError, match="train.optimizer"):
        load_config("tiny", [f"train.optimizer={bad}"])


def test_opt_list_entry_out_of_range_is_refused(tiny_config):
    tiny_config.train.optimizer = "opt-list:999"
    with pytest.raises(ValueError, match="holds entries 0..12"):
        make_optimizer(Transformer(tiny_config.model, tiny_config.retrieval), tiny_config.train)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_resume_reproduces_losses_exactly(tmp_path, byte_store, tiny_config, optimizer):
    """Train 12 steps; drop the checkpoints after step 5 and resume: the optimizer state (plain tensors and
    Python values, loadable with weights_only=True) brings back the same losses and weights."""
    cfg = tiny_config.train
    cfg.optimizer = optimizer
    cfg.steps, cfg.checkpoint_interval, cfg.log_interval, cfg.keep_checkpoints, cfg.eval_interval = 12, 5, 1, 5, 0
    train(tmp_path / "run", byte_store, tiny_config)
    full = losses(tmp_path / "run")
    assert all(math.isfinite(x) for x in full)
    final = (list_checkpoints(tmp_path / "run")[-1] / "model.safetensors").read_bytes()
    state = torch.load(list_checkpoints(tmp_path / "run")[-1] / "optimizer.pt", weights_only=True)
    assert state  # tensors and plain values only
    for ckpt in list_checkpoints(tmp_path / "run")[1:]:  # keep step 5
        shutil.rmtree(ckpt)
    result = train(tmp_path / "run", byte_store, tiny_config, resume=True)
    assert result.step == 12
    assert losses(tmp_path / "run") == full
    assert (list_checkpoints(tmp_path / "run")[-1] / "model.safetensors").read_bytes() == final


def test_resume_with_another_optimizer_is_refused(tmp_path, byte_store, tiny_config):
    cfg = tiny_config.train
    cfg.optimizer, cfg.steps, cfg.checkpoint_interval = "muon", 4, 2
    train(tmp_path / "run", byte_store, tiny_config)
    cfg.optimizer, cfg.steps = "soap", 6
    with pytest.raises(ValueError, match="another train.optimizer"):
        train(tmp_path / "run", byte_store, tiny_config, resume=True)
