"""The serving engine's batched work gives each request what it would get alone: sampling every row in a few
batched calls (``pick_tokens``) draws each row's token from its own seeded generator exactly as ``pick_token``
and ``torch.multinomial`` do."""

from __future__ import annotations

import torch

from knnformer.serve.generate import filter_logits, pick_token, pick_tokens


def seeded(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_pick_tokens_draws_each_row_as_alone_and_as_multinomial():
    logits = torch.randn(7, 256, generator=seeded(0)) * 3
    temperatures = [0.8, 0.0, 0.8, 1.3, 0.8, 0.0, 1.3]
    top_ps = [None, None, 0.9, 1.0, None, 0.5, 0.9]
    seeds = [11, 12, 13, 14, 15, 16, 17]
    batched = [seeded(s) for s in seeds]
    alone = [seeded(s) for s in seeds]
    reference = [seeded(s) for s in seeds]
    draws = []
    for _ in range(30):  # generators advance in step: the 30th draw still agrees
        got = pick_tokens(logits, temperatures, top_ps, batched)
        draws.append(got)
        for r in range(len(seeds)):
            assert got[r] == pick_token(logits[r : r + 1], temperatures[r], None, top_ps[r], alone[r])
            if temperatures[r] == 0:
                assert got[r] == int(logits[r].argmax())
            else:
                probs = filter_logits(logits[r : r + 1], temperatures[r], None, top_ps[r])
                assert got[r] == int(torch.multinomial(probs, 1, generator=reference[r]))
    sampled = [r for r, t in enumerate(temperatures) if t > 0]
    assert all(len({d[r] for d in draws}) > 1 for r in sampled)  # they really sample
    # a row's tokens depend on its own seed only, not on the rows beside it
    first_row_alone = [pick_tokens(logits[:1], temperatures[:1], top_ps[:1], [g])[0]
                       for g in [seeded(11)] for _ in range(30)]
    assert first_row_alone == [d[0] for d in draws]
