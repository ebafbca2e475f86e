"""What each neighbour was worth: masking one neighbour touches only the positions its slot serves, and the
gain is averaged over (slot, neighbour) pairs as stated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knnformer.config import ModelConfig, retrieval_config
from knnformer.eval.gain import neighbour_gain, pair_gains, served_positions
from knnformer.model.transformer import Transformer

C, K, T = 8, 2, 32


def last_layer_retro(**retrieval) -> Transformer:
    """Cross-attention only after the last block: nothing after it mixes positions, so a slot's neighbours can
    only reach the positions that slot serves."""
    torch.manual_seed(0)
    model_cfg = ModelConfig(vocab_size=256, context=T, num_layers=3, num_heads=2, dim=32)
    rcfg = retrieval_config(enabled=True, chunk_size=C, num_neighbours=K, layers="2", **retrieval)
    rcfg.validate(model_cfg)
    model = Transformer(model_cfg, rcfg).eval()
    with torch.no_grad():  # random init leaves CCA's effect tiny; make it visible
        for p in model.retrieval.parameters():
            p.mul_(4.0) if p.dim() == 2 else None
    return model


@pytest.mark.parametrize("retriever", ["frozen", "learned"])
def test_masking_a_neighbour_changes_exactly_the_positions_its_slot_serves(retriever):
    model = last_layer_retro(retriever=retriever)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (1, T), generator=g)
    nb = torch.randint(0, 256, (1, T // C + 1, K, 2 * C), generator=g)
    mask = torch.ones(nb.shape, dtype=torch.bool)
    with torch.no_grad():
        base, _ = model(x, neighbours=nb, neighbour_mask=mask)
        for s in range(T // C + 1):
            for j in range(K):
                m = mask.clone()
                m[0, s, j] = False
                out, _ = model(x, neighbours=nb, neighbour_mask=m)
                changed = (out - base).abs().amax(-1)[0] > 1e-6
                lo, hi = served_positions(s, C, T)
                expected = torch.zeros(T, dtype=torch.bool)
                expected[lo:hi] = True
                assert torch.equal(changed, expected), (s, j, changed.nonzero().flatten().tolist())


def test_served_positions_follow_retro():
    assert served_positions(0, 8, 32) == (0, 7)
    assert served_positions(1, 8, 32) == (7, 15)
    assert served_positions(4, 8, 32) == (31, 32)  # the last slot serves only the window's last position
    assert served_positions(5, 8, 32) == (32, 32)  # beyond the window: nothing


def test_pair_gains_by_hand():
    # window of 8 positions, C = 4: slot 0 serves 0..2, slot 1 serves 3..6, slot 2 serves 7
    base = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 5.0])
    masked = np.array([
        [1.3, 1.3, 1.3, 9.0, 9.0, 9.0, 9.0, 9.0],  # slot 0: +0.3 on its three positions (later ones ignored)
        [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 1.0, 5.0],  # slot 1: (1 + 2 + 2 + 1) / 4 - 2 = -0.5 (it hurt)
        [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 6.0],  # slot 2: 6 - 5 = +1
    ])
    gains = pair_gains(base, masked, np.array([0, 1, 2]), 4)
    np.testing.assert_allclose(gains, [0.3, -0.5, 1.0])


def test_neighbour_gain_counts_every_served_neighbour():
    model = last_layer_retro()
    tokens = np.random.default_rng(0).integers(0, 256, 4 * T + 1)
    g = torch.Generator().manual_seed(2)

    def neighbours(begins, length):
        nb = torch.randint(0, 256, (len(begins), length // C + 1, K, 2 * C), generator=g)
        mask = torch.ones(nb.shape, dtype=torch.bool)
        mask[:, 0] = False  # slot 0 (before the window) has no neighbours
        mask[:, 2, 1] = False  # one missing neighbour
        return nb, mask

    out = neighbour_gain(model, tokens, neighbours, num_windows=3)
    assert out["windows"] == 3
    assert out["pairs"] == 3 * (4 * K - 1)  # slots 1..4 serve positions; slot 2 holds one neighbour
    assert np.isfinite(out["mean_nats_per_token"]) and 0.0 <= out["share_helped"] <= 1.0
