"""Sampling with temperature, top-k and top-p over a KV cache (softmax attention) or a constant-size running
state (Performer attention), streaming UTF-8 text as it is produced; and for a retrieval run, sampling that
retrieves at every chunk boundary (``RetrievingGenerator``, opened for a saved run by its ``for_run``), the one
path ``knnformer generate`` and a server share."""

from __future__ import annotations

import codecs
from collections.abc import Iterator

import numpy as np
import torch

from knnformer.model.layers import empty_cache
from knnformer.model.transformer import Transformer
from knnformer.run.record import run_derived, run_retrieval


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Next-token probabilities (B, V) from logits (B, V) after temperature, top-k and nucleus filtering."""
    logits = logits.float() / max(temperature, 1e-6)
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already reach top_p
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@torch.no_grad()
def sample_ids(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               stop_id: int | None = None) -> Iterator[int]:
    """Yield new token ids one by one. When the cache fills the context, it is rebuilt from the last half (a
    Performer's state does not grow, but its rotary positions end at the context too)."""
    context = model.config.context
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) > context:
        raise ValueError(f"the prompt is {len(prompt)} tokens, longer than the model's context of {context}; "
                         f"shorten it")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    ids = list(prompt)
    cache = empty_cache(model.config, 1, device, next(model.parameters()).dtype)
    logits, _ = model(torch.tensor([ids], device=device), cache=cache)
    for _ in range(max_new_tokens):
        last = logits[:, -1]
        if temperature == 0:
            next_id = int(last.argmax(-1))
        else:
            probs = filter_logits(last, temperature, top_k, top_p)
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        yield next_id
        if stop_id is not None and next_id == stop_id:
            return
        ids.append(next_id)
        if cache.length >= context:
            keep = ids[-(context // 2):]
            cache = empty_cache(model.config, 1, device, next(model.parameters()).dtype)
            logits, _ = model(torch.tensor([keep], device=device), cache=cache)
        else:
            logits, _ = model(torch.tensor([[next_id]], device=device), cache=cache)


def stream_text(tokenizer, ids: Iterator[int]) -> Iterator[str]:
    """Decode token ids to text incrementally, never splitting a UTF-8 character."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for i in ids:
        piece = decoder.decode(tokenizer.id_to_bytes(i))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def open_generation_retriever(model: Transformer, store, run_dir, record: dict, feed: bool) -> tuple:
    """The retriever a run generates with and, when ``feed`` and its learned retriever reads the frozen embedder,
    ``frozen`` = (that embedder, the datastore's vectors of every chunk) for the relevance bias; else None.

    A retrieval run that refreshed searches its own last refresh with its own retriever, two hops if it trained
    so; any other run (or a retrieval run without refreshes) the datastore's index."""
    from knnformer.retrieval.live import open_retriever
    from knnformer.run.record import open_run_retriever
    from knnformer.run.vectors import frozen_vectors, reads_embedder

    rcfg = run_retrieval(record)
    try:
        retriever = (open_run_retriever(model, store, run_dir, record) if rcfg.enabled else None) \
            or open_retriever(store)
    except ValueError as e:
        if feed:
            raise ValueError(f"this run retrieves while it generates: {e}; or pass --retrieval off") from None
        raise
    if rcfg.enabled and retriever.layout.chunk_size != rcfg.chunk_size:
        raise ValueError(f"the index of {store.path} has chunk size {retriever.layout.chunk_size}, the run "
                         f"{rcfg.chunk_size}; rebuild with `knnformer index {store.path} --chunk-size "
                         f"{rcfg.chunk_size} --force`")
    retriever.hops = rcfg.search.hops if rcfg.enabled else 1  # search as the run was trained
    frozen = None
    if feed and reads_embedder(rcfg):  # the relevance bias reads the frozen embedder's vectors
        from knnformer.retrieval.embedders import make_embedder

        frozen = (make_embedder(rcfg.search.embedder), frozen_vectors(store, rcfg, run_derived(record).retriever_input_dim))
    return retriever, frozen


def pick_token(last: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
               generator: torch.Generator) -> int:
    """The next token from one row's logits (1, V): the argmax at temperature 0, else a filtered sample."""
    return pick_tokens(last, [temperature], [top_p], [generator], top_k)[0]


def pick_tokens(logits: torch.Tensor, temperatures: list[float], top_ps: list[float | None],
                generators: list[torch.Generator], top_k: int | None = None) -> list[int]:
    """The next token of each row of logits (n, V), row r with its own temperature, top-p and generator: what
    ``pick_token`` gives row by row, in a few batched calls (a server samples every active row each step).

    Rows of the same temperature and top-p are filtered together (``filter_logits`` works row by row); each
    sampled row draws V exponentials from its own generator and takes argmax(p / e), which is how
    ``torch.multinomial`` draws one sample, so a row's tokens depend only on its seed, never on its batch."""
    out = logits.argmax(-1)
    groups: dict[tuple, list[int]] = {}
    for r, (t, p) in enumerate(zip(temperatures, top_ps)):
        if t != 0:
            groups.setdefault((t, p), []).append(r)
    if groups:
        V = logits.shape[-1]
        for (t, p), rows in groups.items():
            index = torch.tensor(rows)
            probs = filter_logits(logits[index] if len(rows) < len(logits) else logits, t, top_k, p)
            race = torch.stack([torch.empty(V).exponential_(1, generator=generators[r]) for r in rows])
            out[index] = (probs / race).argmax(-1)
    return out.tolist()


def rebuilt_window_start(length: int, context: int, chunk_size: int) -> int:
    """Where the window starts when a cache of ``context`` tokens is full at ``length`` tokens of text: on the
    chunk grid, keeping about the last half of the context, so slots keep their meaning."""
    return -(-(length - context // 2) // chunk_size) * chunk_size


class RetrievingGenerator:
    """Sampling from a retrieval model: at each chunk boundary of the text (prompt included) the completed chunk
    is embedded and searched in the datastore's index, and its neighbours serve the tokens that follow (RETRO).
    With a KV cache (the default): the prompt's window is run once, each new token is one cached step, a slot's
    neighbours are encoded once when its first position arrives (``model.retro.RetrievalCache``); when the cache
    fills the context, it is rebuilt from the last half of the text, the window starting on the chunk grid.
    Without (``cache=False``): each step runs the whole window, which starts on the chunk grid, as before.
    Every retrieval is kept with its latency, so the caller can show which neighbours served which chunk."""

    def __init__(self, model: Transformer, retriever, k: int, continuation: bool = True, feed_model: bool = True,
                 frozen: tuple | None = None, in_context: bool = False):
        """``frozen``: for a learned retriever reading the frozen embedder, (that embedder, the datastore's vectors
        of every chunk): each retrieved chunk's text and neighbours get their vectors for the relevance bias.
        ``retriever``: a datastore's (``live.Retriever``) or retrieval databases (``database.Databases``).
        ``in_context``: any model reads the neighbours of the last complete chunk as text placed before its window
        (In-Context RALM) instead of through cross-attention."""
        self.model, self.retriever, self.k = model, retriever, k
        self.C = retriever.chunk_size
        self.in_context = in_context
        self.continuation, self.feed_model = continuation, feed_model
        self.frozen = frozen
        self.retrieved: dict[int, object] = {}  # sequence chunk index -> NeighbourBatch row
        self.query_vectors: dict[int, np.ndarray] = {}  # sequence chunk index -> frozen vector (with ``frozen``)
        self.latencies_ms: list[float] = []

    @classmethod
    def for_run(cls, model: Transformer, store, run_dir, record: dict, retrieval: str = "auto",
                k: int = 2) -> RetrievingGenerator:
        """The generator of a saved run, searching as the run was trained (``open_generation_retriever``): a
        retrieval run feeds its neighbours to the model unless ``retrieval`` is ``"off"``, with its own number of
        neighbours; a plain LM (or ``"off"``) only searches, ``k`` neighbours a chunk, to show what served each."""
        rcfg = run_retrieval(record)
        if rcfg.enabled and rcfg.search.databases:  # trained against retrieval databases: generate from them
            return cls.for_databases(model, store, run_dir, record, rcfg.search.databases.split(","), retrieval,
                                     "cca")
        feed = rcfg.enabled and retrieval != "off"
        retriever, frozen = open_generation_retriever(model, store, run_dir, record, feed)
        k = (rcfg.eval_neighbours or rcfg.num_neighbours) if rcfg.enabled else k
        return cls(model, retriever, k, rcfg.continuation, feed_model=feed, frozen=frozen)

    @classmethod
    def for_databases(cls, model: Transformer, store, run_dir, record: dict, databases: list[str],
                      retrieval: str = "auto", mode: str = "auto", k: int = 2) -> RetrievingGenerator:
        """A saved run generating from retrieval ``databases`` (``retrieval/database.py``): a RETRO run reads them
        through its cross-attention (``mode`` cca), any run as text in its context (``in-context``; auto: cca for a
        RETRO run, else in-context); with ``retrieval`` off it only searches them, to show what matches."""
        from knnformer.retrieval.database import open_databases

        rcfg = run_retrieval(record)
        if mode == "auto":
            mode = "cca" if rcfg.enabled else "in-context"
        if mode not in ("cca", "in-context"):
            raise ValueError(f"generate reads --retrieval-db with --mode cca or in-context, not {mode!r}")
        if mode == "cca" and not rcfg.enabled:
            raise ValueError(f"--mode cca needs a RETRO run and {run_dir} was trained without retrieval; use "
                             f"--mode in-context")
        dbs = open_databases(databases, store.manifest["tokenizer"]["fingerprint"],
                             rcfg.chunk_size if mode == "cca" else None, f"run {run_dir}")
        feed = retrieval != "off"
        if mode == "cca":
            return cls(model, dbs, rcfg.eval_neighbours or rcfg.num_neighbours, rcfg.continuation, feed_model=feed)
        if 2 * dbs.chunk_size * k + dbs.chunk_size > model.config.context:
            k = max(1, (model.config.context - dbs.chunk_size) // (2 * dbs.chunk_size))
        return cls(model, dbs, k, feed_model=False, in_context=feed)

    def retrieve(self, ids: list[int], chunk: int) -> None:
        import time

        if chunk in self.retrieved:
            return
        text = self.retriever.tokenizer.decode(ids[chunk * self.C : (chunk + 1) * self.C])
        t0 = time.perf_counter()
        nb = self.retriever.neighbours([text], self.k)
        self.latencies_ms.append(1000 * (time.perf_counter() - t0))
        self.retrieved[chunk] = nb
        if self.frozen is not None:
            self.query_vectors[chunk] = np.asarray(self.frozen[0].embed([text])[0], dtype=np.float32)

    def slot_inputs(self, ids: list[int], w0: int, length: int) -> dict:
        """The model's neighbour inputs for the window ``ids[w0 : w0 + length]`` (w0 on the chunk grid):
        neighbours (1, S, K, R) and mask, and with ``frozen`` the retrieval vectors."""
        from knnformer.run.batches import gather_rows

        C, K = self.C, self.k
        R = 2 * C if self.continuation else C
        S = length // C + 1
        tokens = torch.zeros(1, S, K, R, dtype=torch.long)
        mask = torch.zeros(1, S, K, R, dtype=torch.bool)
        neighbour_ids = np.full((1, S, K), -1, dtype=np.int64)
        query = None if self.frozen is None else torch.zeros(1, S, self.frozen[1].shape[1])
        for s in range(S):
            chunk = w0 // C + s - 1
            if chunk >= 0 and chunk in self.retrieved:
                nb = self.retrieved[chunk]
                tokens[0, s] = torch.from_numpy(nb.tokens[0, :, :R])
                mask[0, s] = torch.from_numpy(nb.mask[0, :, :R])
                neighbour_ids[0, s] = nb.ids[0, :K]
                if query is not None:
                    query[0, s] = torch.from_numpy(self.query_vectors[chunk])
        inputs = {"neighbours": tokens, "neighbour_mask": mask}
        if query is not None:
            inputs["retrieval_vectors"] = (query, gather_rows(self.frozen[1], neighbour_ids))
        return inputs

    @property
    def neighbour_tokens(self) -> int:
        """R: tokens per neighbour the model reads (the chunk, and its continuation when trained so)."""
        return 2 * self.C if self.continuation else self.C

    @property
    def feeds(self) -> bool:
        """Whether the model reads the neighbours (else they are only searched, to show what served the text)."""
        return self.feed_model and self.model.retrieval is not None

    def new_cache(self, batch: int = 1):
        """An empty generation cache for ``batch`` rows, with room for neighbours when the model reads them."""
        if not self.feeds:
            return self.model.generation_cache(batch)
        vector_dim = 0 if self.frozen is None else self.frozen[1].shape[1]
        return self.model.generation_cache(batch, self.k, self.neighbour_tokens, vector_dim)

    def slot_tensors(self, chunk: int) -> tuple:
        """The neighbours retrieved with sequence chunk ``chunk`` as one cache slot: tokens and mask (K, R), and
        with ``frozen`` the (query vector, neighbour vectors)."""
        from knnformer.run.batches import gather_rows

        nb, R = self.retrieved[chunk], self.neighbour_tokens
        tokens = torch.from_numpy(np.ascontiguousarray(nb.tokens[0, : self.k, :R]))
        mask = torch.from_numpy(np.ascontiguousarray(nb.mask[0, : self.k, :R]))
        vectors = None
        if self.frozen is not None:
            neighbours = torch.as_tensor(gather_rows(self.frozen[1], nb.ids[:, None, : self.k]))[0, 0]
            vectors = (torch.from_numpy(self.query_vectors[chunk]), neighbours.float())
        return tokens, mask, vectors

    def fill_slots(self, cache, row: int, length: int, w0: int) -> None:
        """Register in ``cache`` (a RetrievalCache, or None) every retrieval that serves the window
        ``ids[w0 : length]`` and is not there yet: slot s holds the neighbours of sequence chunk w0 / C + s - 1."""
        if cache is None or not self.feeds:
            return
        for s in range((length - w0) // self.C + 1):
            chunk = w0 // self.C + s - 1
            if chunk >= 0 and chunk in self.retrieved and not bool(cache.have[row, s]):
                cache.put(row, s, *self.slot_tensors(chunk))

    def prefill(self, cache, ids: list[int], w0: int) -> torch.Tensor:
        """Run the window ``ids[w0:]`` into an empty one-row ``cache`` (or a one-row view of a larger one) with
        its neighbours registered; the logits (1, T, V)."""
        for chunk in range(len(ids) // self.C):
            self.retrieve(ids, chunk)
        if cache.retrieval is not None:
            cache.retrieval.clear(0)
        self.fill_slots(cache.retrieval, 0, len(ids), w0)
        logits, _ = self.model(torch.tensor([ids[w0:]], dtype=torch.long), cache=cache)
        return logits

    def sample(self, prompt: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop_id: int | None = None,
               cache: bool = True) -> Iterator[int]:
        """Yield new token ids, over a KV cache unless ``cache`` is False (each step then runs the whole window).
        faiss searches single-threaded meanwhile: one query gains nothing from threads, and faiss's OpenMP pool
        spinning beside torch's made each step ~10x slower (measured)."""
        import faiss

        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        run = self._sample_cached if cache and not self.in_context else self._sample  # in context: a new prefix
        # each chunk, so every step runs its whole window
        try:
            yield from run(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop_id)
        finally:
            faiss.omp_set_num_threads(threads)

    def _start(self, prompt: list[int], seed: int | None) -> torch.Generator:
        """Check the prompt against the context, put the model in eval mode, and seed the sampler's generator."""
        T = self.model.config.context
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) > T:
            raise ValueError(f"the prompt is {len(prompt)} tokens, longer than the model's context of {T}; shorten it")
        self.model.eval()
        generator = torch.Generator()
        generator.manual_seed(seed) if seed is not None else generator.seed()
        return generator

    @torch.no_grad()
    def _sample_cached(self, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop_id) -> Iterator[int]:
        T, C = self.model.config.context, self.C
        generator = self._start(prompt, seed)
        ids, w0 = list(prompt), 0
        cache = self.new_cache()
        logits = self.prefill(cache, ids, w0)
        for _ in range(max_new_tokens):
            next_id = pick_token(logits[:, -1], temperature, top_k, top_p, generator)
            yield next_id
            if stop_id is not None and next_id == stop_id:
                return
            ids.append(next_id)
            if len(ids) % C == 0:
                self.retrieve(ids, len(ids) // C - 1)
            if len(ids) - w0 > T:  # the cache is full: rebuild it from the last half, on the chunk grid
                w0 = rebuilt_window_start(len(ids), T, C)
                cache = self.new_cache()
                logits = self.prefill(cache, ids, w0)
            else:
                self.fill_slots(cache.retrieval, 0, len(ids), w0)
                logits, _ = self.model(torch.tensor([[next_id]]), cache=cache)
        for chunk in range(len(ids) // C):
            self.retrieve(ids, chunk)

    @torch.no_grad()
    def _sample(self, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop_id) -> Iterator[int]:
        T, C = self.model.config.context, self.C
        generator = self._start(prompt, seed)
        ids = list(prompt)
        for _ in range(max_new_tokens):
            for chunk in range(len(ids) // C):
                self.retrieve(ids, chunk)
            w0 = 0 if len(ids) <= T else -(-(len(ids) - T) // C) * C
            window = ids[w0:]
            inputs = {}
            if self.in_context:
                window = self.in_context_window(ids)
            elif self.feed_model and self.model.retrieval is not None:
                inputs = self.slot_inputs(ids, w0, len(window))
            logits, _ = self.model(torch.tensor([window]), **inputs)
            next_id = pick_token(logits[:, -1], temperature, top_k, top_p, generator)
            yield next_id
            if stop_id is not None and next_id == stop_id:
                return
            ids.append(next_id)
        for chunk in range(len(ids) // C):
            self.retrieve(ids, chunk)

    def in_context_window(self, ids: list[int]) -> list[int]:
        """In-context retrieval: the neighbours of the last complete chunk (nearest last), then as much of the end
        of ``ids`` as the context leaves."""
        from knnformer.retrieval.neighbours import in_context_prefix

        T, C = self.model.config.context, self.C
        last = len(ids) // C - 1
        prefix = []
        if last >= 0:
            nb = self.retrieved[last]
            prefix = in_context_prefix(nb.tokens, nb.mask, self.k)[0].tolist()[-(T - C):]
        return prefix + ids[-(T - len(prefix)):]

    def provenance(self, ids: list[int], first_generated: int) -> list[dict]:
        """For each chunk holding generated tokens: its text and the neighbours that served it (those retrieved
        by the chunk before it), each with its document, offsets, score and text."""
        tokenizer, C = self.retriever.tokenizer, self.C
        out = []
        for chunk in range(first_generated // C, -(-len(ids) // C)):
            served_by = self.retrieved.get(chunk - 1)
            neighbours = []
            if served_by is not None:
                for j in range(self.k):
                    cid = int(served_by.ids[0, j])
                    if cid < 0:
                        continue
                    source = self.retriever.source(cid)
                    source["score"] = float(served_by.scores[0, j])
                    neighbours.append(source)
            out.append({"chunk": chunk, "text": tokenizer.decode(ids[chunk * C : (chunk + 1) * C]),
                        "retrieved_with_chunk": chunk - 1 if served_by is not None else None,
                        "neighbours": neighbours})
        return out
