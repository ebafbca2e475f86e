"""The learned retriever: the LM loss reaches it through MARGE's relevance bias, beta = 0 is the frozen model,
and the bias keeps chunked cross-attention causal."""

from __future__ import annotations

import torch
from test_retro import C, K, random_neighbours, retro_model  # noqa: F401  the same tiny RETRO model


def test_lm_loss_alone_trains_the_retriever_through_the_relevance_bias():
    model = retro_model(retriever="learned").train()
    x, y = torch.randint(0, 256, (2, 32)), torch.randint(0, 256, (2, 32))
    nb, mask = random_neighbours(2, 32)
    _, loss = model(x, y, neighbours=nb, neighbour_mask=mask)
    loss.backward()
    retriever = model.retrieval.retriever
    assert retriever.proj.weight.grad.abs().sum() > 0
    assert retriever.beta.grad.abs() > 0
    # the chunks are embedded by the decoder's first block: it learns from the retrieval path too
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # with beta = 0 the bias is constant: no gradient reaches the projection (only beta itself learns)
    model.zero_grad()
    with torch.no_grad():
        retriever.beta.zero_()
    model(x, y, neighbours=nb, neighbour_mask=mask)[1].backward()
    assert retriever.proj.weight.grad.abs().sum() == 0 and retriever.beta.grad.abs() > 0


def test_beta_zero_is_the_frozen_model():
    learned = retro_model(retriever="learned")
    frozen = retro_model(retriever="frozen")
    missing, unexpected = frozen.load_state_dict(learned.state_dict(), strict=False)
    assert not missing and all(k.startswith("retrieval.retriever.") for k in unexpected)
    x = torch.randint(0, 256, (2, 32))
    nb, mask = random_neighbours(2, 32)
    with torch.no_grad():
        learned.retrieval.retriever.beta.zero_()
    assert torch.allclose(learned(x, neighbours=nb, neighbour_mask=mask)[0],
                          frozen(x, neighbours=nb, neighbour_mask=mask)[0], atol=1e-6)
    with torch.no_grad():
        learned.retrieval.retriever.beta.fill_(3.0)
    assert not torch.allclose(learned(x, neighbours=nb, neighbour_mask=mask)[0],
                              frozen(x, neighbours=nb, neighbour_mask=mask)[0], atol=1e-4)


def test_relevance_is_the_cosine_of_the_chunks_embedded_alone():
    model = retro_model(retriever="learned")
    retriever = model.retrieval.retriever
    x = torch.randint(0, 256, (1, 32))
    nb, mask = random_neighbours(1, 32)
    mask[0, 2, 1, 5:] = False  # a short neighbour: its padding must not count
    rel = retriever.relevance(model, x, nb, mask)
    assert rel.shape == (1, 5, K) and torch.all(rel[:, 0] == 0)  # slot 0's query lies before the window
    with torch.no_grad():
        q = retriever.embed(model, x[:, C : 2 * C], torch.ones(1, C, dtype=torch.bool))
        z = retriever.embed(model, nb[0, 2, 1, :5][None], torch.ones(1, 5, dtype=torch.bool))
    assert torch.allclose(rel[0, 2, 1], (q * z).sum(), atol=1e-5)
    # an untrained retriever (identity projection) is the mean-pooled state itself
    h = model.blocks[0](model.embed(x[:, :C]), model.rope_cos[:C], model.rope_sin[:C]).mean(1)
    assert torch.allclose(retriever.embed(model, x[:, :C], torch.ones(1, C, dtype=torch.bool)),
                          torch.nn.functional.normalize(h, dim=-1), atol=1e-5)


def test_causality_with_a_learned_retriever():
    model = retro_model(retriever="learned", relevance_beta=2.0)
    x = torch.randint(0, 256, (2, 32))
    nb, mask = random_neighbours(2, 32)
    base, _ = model(x, neighbours=nb, neighbour_mask=mask)
    for t in (0, 7, 8, 15, 16, 31):
        y, nb2 = x.clone(), nb.clone()
        y[:, t] = (y[:, t] + 1) % 256
        nb2[:, t // C + 1] = torch.randint(0, 256, nb2[:, t // C + 1].shape)
        out, _ = model(y, neighbours=nb2, neighbour_mask=mask)
        assert torch.allclose(out[:, :t], base[:, :t], atol=1e-6), t


def test_a_window_shorter_than_a_chunk_reads_only_slot_0():
    """Generation starts with fewer than C tokens: one slot, whose query lies before the text (bias 0)."""
    model = retro_model(retriever="learned")
    x = torch.randint(0, 256, (1, 5))
    nb, mask = random_neighbours(1, 5)
    assert model.retrieval.retriever.relevance(model, x, nb, mask).abs().sum() == 0
    assert torch.isfinite(model(x, neighbours=nb, neighbour_mask=mask)[0]).all()


def test_a_retriever_reading_the_frozen_embedder_starts_at_its_cosines_and_learns_from_the_lm_loss():
    import torch.nn.functional as F

    model = retro_model(retriever="learned", retriever_input="embedder", retriever_input_dim=24).train()
    retriever = model.retrieval.retriever
    x, y = torch.randint(0, 256, (2, 32)), torch.randint(0, 256, (2, 32))
    nb, mask = random_neighbours(2, 32)
    g = torch.Generator().manual_seed(3)
    q, z = torch.randn(2, 5, 24, generator=g), torch.randn(2, 5, K, 24, generator=g)
    z[1, 3, 1] = 0  # no neighbour there: no vector, cosine 0
    rel = retriever.relevance(model, x, nb, mask, (q, z))
    expected = torch.einsum("bsd,bskd->bsk", F.normalize(q, dim=-1), F.normalize(z, dim=-1, eps=1e-6))
    assert torch.allclose(rel, expected, atol=1e-6) and rel[1, 3, 1] == 0  # identity projection at the start
    _, loss = model(x, y, neighbours=nb, neighbour_mask=mask, retrieval_vectors=(q, z))
    loss.backward()
    assert retriever.proj.weight.grad.abs().sum() > 0 and retriever.beta.grad.abs() > 0
    # it reads no tokens: the decoder's first block learns nothing through the retriever
    model.zero_grad()
    retriever.relevance(model, x, nb, mask, (q, z)).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is None
    try:
        model(x, y, neighbours=nb, neighbour_mask=mask)
    except ValueError as e:
        assert "retrieval_vectors" in str(e)
    else:
        raise AssertionError("a retriever reading the embedder ran without its vectors")
