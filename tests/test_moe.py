"""Mixture-of-Experts: parity with the dense FFN, dispatch, capacity, the balance loss, gradients, expert choice,
resume, generation with a KV cache, retrieval and evaluation with MoE on."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from test_model import assert_cached_decoding_matches_full_forward

from knnformer.config import ModelConfig, MoEConfig, load_config, retrieval_config
from knnformer.eval.evaluate import evaluate_run, format_table
from knnformer.model.layers import SwiGLU
from knnformer.model.moe import MoE, balance_loss, expert_choice, moe_layers, token_choice
from knnformer.model.transformer import Transformer, flops_per_token
from knnformer.run.checkpoint import latest_checkpoint
from knnformer.train.trainer import train

DIM = 32


def moe_config(**moe) -> ModelConfig:
    return ModelConfig(vocab_size=256, context=32, num_layers=2, num_heads=2, dim=DIM, ffn="moe",
                       moe=MoEConfig(**moe))


def moe_layer(seed: int = 0, **moe) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(moe_config(**moe))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def reference(layer: MoE, x: torch.Tensor, routes: list[list[tuple[int, float]]]) -> torch.Tensor:
    """Per token, a Python loop: sum of gate * expert_e(x) over the (expert, gate) pairs in ``routes``."""
    out = torch.zeros_like(x)
    for n, pairs in enumerate(routes):
        for e, g in pairs:
            gate, up = (x[n] @ layer.experts_gate_up[e]).chunk(2)
            out[n] += g * ((F.silu(gate) * up) @ layer.experts_down[e])
    return out


@pytest.mark.parametrize("router", ["top1", "expert_choice"])
def test_one_expert_with_room_for_every_token_equals_the_dense_ffn(router):
    config = moe_config(num_experts=1, router=router, capacity_factor=1.0)
    torch.manual_seed(0)
    dense, moe = SwiGLU(config), MoE(config)
    with torch.no_grad():
        moe.experts_gate_up.copy_(dense.gate_up.weight.t()[None])
        moe.experts_down.copy_(dense.down.weight.t()[None])
    x = torch.randn(3, 16, DIM)
    for mode in (True, False):
        moe.train(mode), dense.train(mode)
        assert torch.allclose(moe(x), dense(x), atol=1e-6)
        assert moe.stats["dropped"] == 0
    # and a whole model: the dense model's weights, moved into the single expert, give the same logits
    torch.manual_seed(1)
    plain = Transformer(ModelConfig(vocab_size=256, context=32, num_layers=2, num_heads=2, dim=DIM)).eval()
    mixed = Transformer(config).eval()
    weights = {}
    for name, value in plain.state_dict().items():
        if name.endswith("ffn.gate_up.weight"):
            weights[name.replace("gate_up.weight", "experts_gate_up")] = value.t()[None]
        elif name.endswith("ffn.down.weight"):
            weights[name.replace("down.weight", "experts_down")] = value.t()[None]
        else:
            weights[name] = value
    for i in range(2):
        weights[f"blocks.{i}.ffn.router.weight"] = torch.randn(1, DIM)
    mixed.load_state_dict(weights)
    idx = torch.randint(0, 256, (2, 32))
    assert torch.allclose(mixed(idx)[0], plain(idx)[0], atol=1e-5)


@pytest.mark.parametrize("router", ["top1", "top2"])
def test_dispatch_matches_a_per_token_loop_and_drops_nothing_when_capacity_allows(router):
    layer = moe_layer(num_experts=4, router=router, capacity_factor=4.0, second_expert_sampling=False)
    x = torch.randn(2, 8, DIM)
    out = layer(x).view(16, DIM)
    assert layer.stats["dropped"] == 0
    probs = F.linear(x.view(16, DIM), layer.router.weight).softmax(-1)
    k = 2 if router == "top2" else 1
    gates, experts = probs.topk(k, -1)
    if k == 2:
        gates = gates / gates.sum(-1, keepdim=True)
    routes = [list(zip(experts[n].tolist(), gates[n].tolist())) for n in range(16)]
    assert torch.allclose(out, reference(layer, x.view(16, DIM), routes), atol=1e-5)
    # evaluation with eval_capacity_factor 0 never drops, however unbalanced the router
    with torch.no_grad():
        layer.router.weight[0] += 50 * x.view(16, DIM).mean(0)  # expert 0 first for (nearly) every token
    layer.eval()
    layer(x)
    assert layer.stats["dropped"] == 0 and max(layer.stats["load"]) > 0.4


@pytest.mark.parametrize("router", ["top1", "top2"])
def test_grouped_gemm_and_padded_bmm_dispatch_agree(router):
    x = torch.rand(2, 16, DIM) + 0.1  # positive, so the router offsets below act the same on every token
    results = []
    for grouped in (True, False):
        layer = moe_layer(num_experts=8, router=router, capacity_factor=1.0, grouped_mm=grouped,
                          second_expert_sampling=False)
        with torch.no_grad():
            layer.router.weight[5:] -= 100  # experts 5, 6, 7 get no token: empty groups
        out = layer(x)
        out.square().sum().backward()
        results.append((out, layer.experts_gate_up.grad, layer.experts_down.grad, layer.router.weight.grad))
        assert layer.stats["dropped"] > 0  # capacity binds, so both paths must drop the same assignments
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()
    assert results[0][1][5:].abs().sum() == 0


def test_tokens_over_capacity_get_no_output_and_pass_through_the_residual():
    layer = moe_layer(num_experts=4, router="top1", capacity_factor=1.0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2] = 1.0
    x = torch.rand(1, 16, DIM) + 0.1  # positive: every token's first choice is expert 2
    out = layer(x)[0]
    cap = math.ceil(16 / 4)
    assert layer.stats["dropped"] == pytest.approx(1 - cap / 16)
    assert out[:cap].abs().sum(-1).gt(0).all()  # the first `cap` tokens fill expert 2 ...
    assert torch.equal(out[cap:], torch.zeros_like(out[cap:]))  # ... the rest get zero: the residual alone
    assert layer.stats["load"].tolist() == [0.0, 0.0, 1.0, 0.0]


def test_balance_loss_matches_a_hand_computation_and_is_one_for_a_uniform_router():
    logits = torch.tensor([[2.0, 0.0, 0.0, 1.0], [0.0, 3.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0]])
    probs = logits.softmax(-1)
    first = probs.argmax(-1)  # experts 0, 1, 0
    f = [2 / 3, 1 / 3, 0, 0]
    P = [float(probs[:, e].mean()) for e in range(4)]
    hand = 4 * sum(fe * pe for fe, pe in zip(f, P))
    assert float(balance_loss(probs, first)) == pytest.approx(hand, rel=1e-6)
    uniform = torch.full((10, 4), 0.25)
    assert float(balance_loss(uniform, torch.arange(10) % 4)) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # any router giving every token the same probabilities p: E * max(p) > 1
        p = torch.softmax(torch.randn(4, generator=g), -1).expand(10, 4)
        value = float(balance_loss(p, p.argmax(-1)))
        assert value == pytest.approx(4 * float(p[0].max()), rel=1e-6) and value > 1.0
    # and its gradient lowers the probability of the over-chosen expert
    skew = torch.tensor([[2.0, 0.0, 0.0, 0.0]] * 8, requires_grad=True)
    pr = skew.softmax(-1)
    balance_loss(pr, pr.argmax(-1)).backward()
    assert skew.grad[:, 0].gt(0).all() and skew.grad[:, 1:].lt(0).all()


def test_top2_takes_the_second_expert_with_probability_twice_its_gate():
    torch.manual_seed(0)
    probs = (3 * torch.randn(20000, 8)).softmax(-1)
    experts, gates, taken = token_choice(probs, 2, sample_second=True)
    assert torch.allclose(gates.sum(-1), torch.ones(20000)) and taken[:, 0].all()
    assert taken[:, 1].float().mean() == pytest.approx(float((2 * gates[:, 1]).mean()), abs=0.01)
    small = gates[:, 1] < 0.1  # a weak second choice is rarely taken
    assert taken[small, 1].float().mean() < 0.2
    assert token_choice(probs, 2, sample_second=False)[2].all()


@pytest.mark.parametrize("router", ["top1", "top2", "expert_choice"])
def test_gradients_reach_every_selected_expert_and_the_router(router):
    layer = moe_layer(num_experts=6, router=router, capacity_factor=1.0, aux_loss_weight=0.0,
                      second_expert_sampling=False)
    x = torch.randn(2, 4, DIM)
    layer(x).square().sum().backward()  # the task loss alone: the router learns through the gates
    probs = F.linear(x.view(8, DIM), layer.router.weight).softmax(-1)
    if router == "expert_choice":
        selected = set(range(6))
    else:
        selected = set(probs.topk(2 if router == "top2" else 1, -1).indices.flatten().tolist())
    assert layer.router.weight.grad.abs().sum() > 0
    for e in range(6):
        reached = layer.experts_gate_up.grad[e].abs().sum() > 0 and layer.experts_down.grad[e].abs().sum() > 0
        assert reached == (e in selected), e


def test_expert_choice_gives_each_expert_exactly_capacity_tokens():
    probs = torch.randn(40, 8).softmax(-1)
    token_of, gates = expert_choice(probs, 10)
    assert token_of.shape == (8, 10)
    for e in range(8):
        assert len(set(token_of[e].tolist())) == 10  # ten distinct tokens
        assert torch.equal(gates[e], probs[token_of[e], e])
        assert gates[e].min() >= probs[:, e].sort(descending=True).values[9]  # its ten best
    layer = moe_layer(num_experts=4, router="expert_choice", capacity_factor=1.0)
    layer(torch.randn(1, 16, DIM))
    assert layer.stats["load"].tolist() == [0.25] * 4


@pytest.mark.parametrize("router", ["top1", "top2"])
def test_kv_cache_generation_equals_full_forward(router):
    torch.manual_seed(0)
    assert_cached_decoding_matches_full_forward(Transformer(moe_config(num_experts=4, router=router)).eval())


def test_retrieval_with_moe_trains_and_stays_causal():
    torch.manual_seed(0)
    config = moe_config(num_experts=4, router="top2")
    config.num_layers, config.moe.every = 3, 2
    rcfg = retrieval_config(enabled=True, chunk_size=8, num_neighbours=2)
    rcfg.validate(config)
    model = Transformer(config, rcfg)
    assert [i for i, _ in moe_layers(model)] == [1]
    x = torch.randint(0, 256, (2, 32))
    nb, mask = torch.randint(0, 256, (2, 5, 2, 16)), torch.ones(2, 5, 2, 16, dtype=torch.bool)
    _, loss = model(x, x, neighbours=nb, neighbour_mask=mask)
    (loss + model.aux_loss()).backward()
    assert model.blocks[1].ffn.experts_down.grad.abs().sum() > 0
    assert model.retrieval.encoder[0].qkv.weight.grad.abs().sum() > 0
    model.eval()
    base, _ = model(x, neighbours=nb, neighbour_mask=mask)
    y = x.clone()
    y[:, 20] = (y[:, 20] + 1) % 256
    out, _ = model(y, neighbours=nb, neighbour_mask=mask)
    assert torch.allclose(out[:, :20], base[:, :20], atol=1e-6)


def test_config_every_other_layer_flops_and_validation():
    config = load_config("tiny", ["model.ffn=moe", "model.moe.every=2", "model.moe.num_experts=4",
                                  "model.num_layers=4"])
    config.model.vocab_size = 256
    model = Transformer(config.model)
    assert [i for i, _ in moe_layers(model)] == [1, 3]
    assert model.aux_loss() is None  # before any forward
    dense = ModelConfig(vocab_size=256, dim=64, num_heads=2, ffn_hidden=128)
    top2 = ModelConfig(vocab_size=256, dim=64, num_heads=2, ffn="moe", moe=MoEConfig(expert_hidden=64))
    router = dense.num_layers * 6 * 64 * 8
    assert flops_per_token(top2) == flops_per_token(dense) + router  # equal active FLOPs, plus the router
    with pytest.raises(ValueError, match="model.moe.router must be one of"):
        load_config("tiny", ["model.ffn=moe", "model.moe.router=top3"])
    with pytest.raises(ValueError, match="num_experts >= 2"):
        load_config("tiny", ["model.ffn=moe", "model.moe.num_experts=1"])
    with pytest.raises(ValueError, match="leaves no MoE layer"):
        load_config("tiny", ["model.ffn=moe", "model.moe.every=3"])
    with pytest.raises(ValueError, match="capacity_factor"):
        load_config("tiny", ["model.moe.capacity_factor=0"])


def test_resume_reproduces_moe_losses_and_evaluate_reports_expert_stats(tmp_path, byte_store, tiny_config):
    tiny_config.model.ffn = "moe"
    tiny_config.model.moe = MoEConfig(num_experts=4, router="top2", router_noise=0.1, z_loss_weight=1e-3)
    cfg = tiny_config.train
    cfg.steps, cfg.checkpoint_interval, cfg.log_interval, cfg.keep_checkpoints = 8, 3, 1, 5
    train(tmp_path / "full", byte_store, tiny_config)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows[0]["moe"]) == 2 and rows[0]["aux_loss"] > 0
    assert sum(rows[0]["moe"][0]["load"]) == pytest.approx(1.0, abs=1e-3)
    cfg.steps = 5  # checkpoints at 3 and 5; resume from 3, the sampled second experts and the jitter replayed
    train(tmp_path / "part", byte_store, tiny_config)
    shutil.rmtree(latest_checkpoint(tmp_path / "part"))
    cfg.steps = 8
    train(tmp_path / "part", byte_store, tiny_config, resume=True)
    again = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in again] == [r["loss"] for r in rows]
    assert [r["aux_loss"] for r in again] == [r["aux_loss"] for r in rows]
    result = evaluate_run(tmp_path / "full")
    assert [m["layer"] for m in result["moe"]] == [0, 1] and result["moe"][0]["dropped"] == 0
    assert "MoE layer 1" in format_table(result)


def test_retrieval_run_with_moe_trains_evaluates_and_generates(tmp_path):
    from test_retrieval_model import repeated_text_store

    from knnformer.retrieval.live import open_retriever
    from knnformer.run.record import load_run
    from knnformer.serve.generate import RetrievingGenerator

    store = repeated_text_store(tmp_path)
    config = load_config("tiny", ["model.context=64", "train.steps=6", "train.eval_interval=3",
                                  "train.checkpoint_interval=6", "retrieval.enabled=true", "model.ffn=moe",
                                  "model.moe.num_experts=4", "model.moe.every=2"])
    config.model.vocab_size = 256
    train(tmp_path / "run", store, config)
    result = evaluate_run(tmp_path / "run", "valid")
    assert result["retrieval"] == "on" and [m["layer"] for m in result["moe"]] == [1]
    model, record, _ = load_run(tmp_path / "run")
    generator = RetrievingGenerator(model, open_retriever(store), k=2)
    assert len(list(generator.sample(list(b"abc"), 20, seed=0))) == 20


@pytest.mark.slow
def test_compiled_moe_model_matches_eager():
    torch.manual_seed(0)
    model = Transformer(moe_config(num_experts=4, router="top2", second_expert_sampling=False))
    x = torch.randint(0, 256, (4, 32))
    _, eager = model(x, x)
    eager_aux = model.aux_loss()
    _, compiled = torch.compile(model)(x, x)
    assert torch.allclose(compiled, eager, atol=1e-4) and torch.allclose(model.aux_loss(), eager_aux, atol=1e-5)
