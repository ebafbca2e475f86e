"""RETRO chunked cross-attention: exact causality, retrieval off is the plain LM, empty slots are safe."""

from __future__ import annotations

import torch

from knnformer.config import ModelConfig, retrieval_config
from knnformer.model.transformer import Transformer

C, K = 8, 2


def retro_model(seed: int = 0, **retrieval) -> Transformer:
    torch.manual_seed(seed)
    model_cfg = ModelConfig(vocab_size=256, context=32, num_layers=3, num_heads=2, dim=32)
    input_dim = retrieval.pop("retriever_input_dim", 0)  # derived from the datastore in a run
    rcfg = retrieval_config(enabled=True, chunk_size=C, num_neighbours=K, **retrieval)
    rcfg.validate(model_cfg)
    return Transformer(model_cfg, rcfg, input_dim).eval()


def random_neighbours(B: int, T: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    S = T // C + 1
    ids = torch.randint(0, 256, (B, S, K, 2 * C), generator=g)
    mask = torch.ones(B, S, K, 2 * C, dtype=torch.bool)
    return ids, mask


def test_causality_with_retrieval():
    """Changing token t (and with it the neighbours that chunk t // C retrieves, slot t // C + 1) changes no
    output before t."""
    model = retro_model()
    x = torch.randint(0, 256, (2, 32))
    nb, mask = random_neighbours(2, 32)
    base, _ = model(x, neighbours=nb, neighbour_mask=mask)
    for t in (0, 5, 7, 8, 15, 16, 30, 31):
        y, nb2 = x.clone(), nb.clone()
        y[:, t] = (y[:, t] + 1) % 256
        slot = t // C + 1
        nb2[:, slot] = torch.randint(0, 256, nb2[:, slot].shape)
        out, _ = model(y, neighbours=nb2, neighbour_mask=mask)
        assert torch.allclose(out[:, :t], base[:, :t], atol=1e-6), t
        assert not torch.allclose(out[:, t:], base[:, t:])


def test_neighbours_serve_exactly_their_positions():
    """Slot s's neighbours change positions s*C - 1 .. s*C + C - 2 and nothing else (RETRO's CCA)."""
    model = retro_model(condition_encoder=False, layers="2")  # one CCA layer after the last block: no mixing
    x = torch.randint(0, 256, (1, 32))
    nb, mask = random_neighbours(1, 32)
    base, _ = model(x, neighbours=nb, neighbour_mask=mask)
    for slot in range(32 // C + 1):
        nb2 = nb.clone()
        nb2[:, slot] = (nb2[:, slot] + 1) % 256
        out, _ = model(x, neighbours=nb2, neighbour_mask=mask)
        changed = (out - base).abs().amax(-1)[0] > 1e-6
        lo, hi = max(0, slot * C - 1), min(31, slot * C + C - 2)
        expected = torch.zeros(32, dtype=torch.bool)
        expected[lo : hi + 1] = True
        assert torch.equal(changed, expected), slot


def test_retrieval_off_equals_plain_lm():
    model = retro_model()
    plain = Transformer(model.config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("retrieval.") for k in unexpected)
    x = torch.randint(0, 256, (2, 32))
    assert torch.equal(model(x)[0], plain.eval()(x)[0])


def test_masked_slots_give_finite_outputs_and_gradients():
    model = retro_model().train()
    x = torch.randint(0, 256, (2, 27))  # not a multiple of the chunk size
    nb, mask = random_neighbours(2, 27)
    mask[:, 0] = False  # no text before the window
    mask[1] = False  # a sequence with no neighbours at all
    _, loss = model(x, torch.randint(0, 256, (2, 27)), neighbours=nb, neighbour_mask=mask)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.retrieval.encoder_in.weight.grad.abs().sum() > 0
