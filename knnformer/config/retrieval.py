"""The retrieval section of the config: RETRO's architecture and its ``retriever``, ``refresh`` and ``search``
sections, the refresh schedule's syntax, how the flat keys of older runs and presets map onto the sections, and
``Derived``: what a run derives from its datastore and records beside its config.

Schema only: nothing here reads files or runs a model. ``knnformer.config`` re-exports every name.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

logger = logging.getLogger("knnformer.config")

Schedule = list[tuple[int, int | None, int]]


def parse_schedule(text: str) -> Schedule:
    """``"a-b:every,c-:every"`` -> [(a, b, every), (c, None, every)]: half-open step ranges, an open end for the
    last; ranges ascending and not overlapping. Empty text is no refresh."""
    schedule: Schedule = []
    fix = "write it as start-end:every ranges, e.g. \"0-1000:250,1000-:1000\""
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            span, every = part.split(":")
            lo, hi = span.split("-")
            item = (int(lo), int(hi) if hi.strip() else None, int(every))
        except ValueError:
            raise ValueError(f"retrieval.refresh.schedule: cannot read {part!r}; {fix}") from None
        lo, hi, every = item
        if lo < 0 or every <= 0 or (hi is not None and hi <= lo):
            raise ValueError(f"retrieval.refresh.schedule: {part!r} needs 0 <= start < end and every > 0; {fix}")
        if schedule and (schedule[-1][1] is None or lo < schedule[-1][1]):
            raise ValueError(f"retrieval.refresh.schedule: {part!r} overlaps the range before it; give ranges in order")
        schedule.append(item)
    return schedule


def resolved_lag(lag: int, schedule: Schedule) -> int:
    """The refresh lag in steps (``retrieval.refresh.lag``; -1: half the shortest interval), refused when a refresh
    would fall due before the previous one is swapped in."""
    shortest = min((every for _, _, every in schedule), default=0)
    if lag == -1:
        return shortest // 2
    if lag < 0:
        raise ValueError(f"retrieval.refresh.lag must be >= 0 steps, or -1 for half the interval, got {lag}")
    if schedule and lag >= shortest:
        raise ValueError(f"retrieval.refresh.lag {lag} must be shorter than the shortest refresh interval "
                         f"({shortest} steps): a refresh must be swapped in before the next one starts")
    return lag


@dataclass
class RetrieverConfig:
    """``retrieval.retriever.kind``: what orders a chunk's neighbours and whether it learns (``retriever.py``)."""

    kind: Literal["frozen", "learned"] = "frozen"
    """``frozen``: neighbours and their order come from the datastore's embedder and nothing in the model scores
    them. ``learned``: the model embeds each query chunk and each neighbour itself (retriever.py) and adds MARGE's
    relevance bias ``beta * cos(q_u, z_j)`` to the cross-attention logits of neighbour j, so the language-modelling
    loss trains the retriever; ``refresh`` re-embeds the corpus with it."""
    init: Literal["frozen", "scratch"] = "frozen"
    """Where a learned retriever's neighbours start: ``frozen`` trains on the datastore's neighbours (its frozen
    embedder's) until the first scheduled refresh after step 0; ``scratch`` refreshes at step 0, so every
    neighbour comes from the learned retriever."""
    input: Literal["tokens", "embedder"] = "tokens"
    """What a learned retriever reads. ``tokens``: the chunk's tokens through decoder blocks 0 ..
    ``retriever_layer`` (the model embeds every query and neighbour chunk itself, and a refresh re-embeds every
    chunk). ``embedder``: the datastore's frozen embedder vectors of the chunk (e.g. minilm's), through the learned
    projection, initialised to the identity: the retriever starts exactly at the frozen embedder's neighbours and
    learns to re-weigh its dimensions (Atlas-style adaptation); a step costs about what a frozen one does and a
    refresh only projects the stored vectors before re-indexing. Needs a dense embedder's index (not bm25)."""
    layer: int = 0
    """A learned retriever reads decoder blocks 0 .. this one, run on the chunk's tokens alone, mean-pooled. 0 (one
    block) keeps its cost per neighbour chunk at 1/num_layers of a decoder pass; the layer of the first
    chunked cross-attention reads what the model itself reads there, at a higher cost."""
    dim: int = 0
    """Width of the learned retriever's unit vectors; 0 means ``model.dim`` with the projection initialised to the
    identity (the run's own mean-pooled chunk state, as ``--embedder run:RUN``)."""
    lr_scale: float = 1.0
    """The learned retriever's own parameters (projection, beta) learn at ``train.lr`` times this, without weight
    decay."""
    relevance_beta: float = 1.0
    """Initial value of the learned scalar beta of the relevance bias (0 switches the bias, and with it the
    retriever's gradient, off at the start)."""


@dataclass
class RefreshConfig:
    """``retrieval.refresh.schedule``: when and how a learned retriever re-embeds the corpus (``train/refresh.py``)."""

    schedule: str = ""
    """When a learned retriever re-embeds every chunk and rebuilds the index and neighbours, as ``start-end:every``
    ranges of optimizer steps, e.g. ``"0-1000:250,1000-:1000"`` (every 250 steps until 1000, then every 1000);
    empty never refreshes. See ``parse_schedule``."""
    lag: int = -1
    """Steps between the start of a refresh and the step whose batches first read its neighbours. > 0: the refresh
    runs on a background thread from a copy of the weights at its start, while training goes on with the
    previous neighbours; it is swapped in exactly ``refresh_lag`` steps later (training waits there only if it is
    not done), so which neighbours a step reads never depends on timing. 0: synchronous (training waits for every
    refresh). -1: half the shortest interval of the schedule."""
    index: str = "auto"
    """Index kind a refresh builds (auto, flat, hnsw or ivfpq; auto as in ``knnformer index``)."""
    mode: Literal["reindex", "rerank"] = "reindex"
    """``reindex``: a refresh searches every train chunk with the new vectors (an index is built). ``rerank``
    (Atlas): it re-orders each chunk's candidates, the datastore's own neighbours (all of ``knnformer index
    --k``), by the new vectors: no index and no search, so a refresh costs the embedding alone, but neighbours
    stay among the frozen embedder's candidates. Its recall is the share of the exact top 10 (new vectors,
    leakage rules applied) found among the candidates, on a sample."""
    ef_search: int = 64
    """Search breadth of a refresh's HNSW index (``knnformer index`` uses 256): on sympy's learned vectors recall@10
    0.969 instead of 0.989 for 3.5x less search time, the largest part of a refresh there. The recall floor below
    still applies."""
    recall_floor: float = 0.9
    """A refreshed approximate index whose recall@10 against exact search falls below this is replaced by an
    exact (flat) one."""


@dataclass
class SearchConfig:
    """``retrieval.search``: where a chunk's neighbours come from: which embedder's index, which sources, how many
    hops."""

    embedder: str = ""
    """The embedder the datastore's neighbours must come from; empty accepts the datastore's current index."""
    sources: str = "train"
    """Where neighbours come from: ``train`` (the train chunks' index), or ``train,past``: also the chunks of the
    query's own document that end before the window (exact search by the same embeddings), merged by score."""
    hops: int = 1
    """1: each chunk's neighbours are those of its own text. 2: multi-hop retrieval: a second search whose query
    is the chunk joined with its first-hop top neighbour; the chunk gets that neighbour, then the second hop's
    results (hops.py). Needs ``knnformer index --hops 2`` (a learned retriever's refreshes compute both hops)."""
    databases: str = ""
    """Retrieval databases (comma-separated datastore paths, ``retrieval/database.py``) searched instead of the
    datastore's own train chunks, in training and by default at evaluation and generation (``--retrieval-db``);
    empty: the datastore's own precomputed neighbours."""


@dataclass
class RetrievalConfig:
    """RETRO's architecture (the fields here), then the retriever, its refreshes and the search as sections."""

    enabled: bool = False
    """Train and evaluate with RETRO chunked cross-attention to neighbours precomputed by ``knnformer index``."""
    chunk_size: int = 0
    """Tokens per chunk (C); must divide ``model.context``; 0 takes the chunk size the index was built with."""
    num_neighbours: int = 1
    """Neighbours (K) each chunk attends to in training. 1 since issue 13's comparison (BENCHMARKS.md "Issue 13:
    RETRO defaults"): K = 2 cost more per step for no measured gain in bits per byte."""
    eval_neighbours: int = 0
    """Neighbours each chunk attends to at evaluation; 0 means ``num_neighbours``."""
    layers: str = "auto"
    """Decoder layers (0-based, comma-separated) followed by chunked cross-attention; ``auto`` = RETRO's rule
    scaled to the depth: every third layer from the middle one (layer 2 of 4, 3 of 6, 4 and 7 of 8, 6 and 9 of 12)."""
    encoder_layers: int = 1
    """Blocks of the bidirectional neighbour encoder."""
    encoder_dim: int = 0
    """Width of the neighbour encoder; 0 means a quarter of ``model.dim`` (half before issue 13's comparison: a run
    recorded then with 0 keeps half, ``Derived.encoder_dim``)."""
    encoder_heads: int = 0
    """Attention heads of the neighbour encoder; 0 means heads of width 32 (at least one). Narrow heads are
    slow on CPU: with 4 heads of 8 the encoder's attention backward cost more than its matmuls."""
    continuation: bool = True
    """Give each neighbour its continuation (the next chunk), as RETRO does: neighbours are 2C tokens long."""
    condition_encoder: bool = True
    """Let the neighbour encoder cross-attend to the decoder's states of the chunk that retrieved them (RETRO)."""
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    """The retriever (``retrieval.retriever.kind`` and the learned retriever's settings)."""
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    """A learned retriever's refreshes."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """The embedder, sources and hops of the neighbour search."""

    def resolved_sources(self) -> set[str]:
        names = {s.strip() for s in self.search.sources.split(",") if s.strip()}
        if not names or "train" not in names or names - {"train", "past"}:
            raise ValueError(f"retrieval.search.sources must be 'train' or 'train,past', got {self.search.sources!r}")
        return names

    def resolved_encoder(self, model) -> tuple[int, int]:
        """(width, heads) of the neighbour encoder; ``model`` is the config's model section (``ModelConfig``)."""
        dim = self.encoder_dim or model.dim // 4
        return dim, self.encoder_heads or max(1, dim // 32)

    def resolved_layers(self, num_layers: int) -> list[int]:
        if self.layers == "auto":  # RETRO: 32 layers, CCA from layer 6 (1-based) every third
            return list(range(num_layers // 2, num_layers, 3))
        try:
            layers = sorted({int(x) for x in self.layers.split(",") if x.strip()})
        except ValueError:
            raise ValueError(f"retrieval.layers must be 'auto' or comma-separated layer numbers, got {self.layers!r}")
        if not layers or layers[0] < 0 or layers[-1] >= num_layers:
            raise ValueError(f"retrieval.layers {self.layers!r} must name layers 0..{num_layers - 1}")
        return layers

    def validate(self, model) -> None:
        if not self.enabled:
            return
        if self.chunk_size < 0 or (self.chunk_size and model.context % self.chunk_size):
            raise ValueError(f"retrieval.chunk_size ({self.chunk_size}) must divide model.context ({model.context})")
        if self.num_neighbours <= 0 or self.eval_neighbours < 0:
            raise ValueError("retrieval.num_neighbours must be positive and retrieval.eval_neighbours >= 0")
        if self.encoder_layers <= 0:
            raise ValueError("retrieval.encoder_layers must be positive")
        dim, heads = self.resolved_encoder(model)
        if heads <= 0 or dim % heads or (dim // heads) % 2:
            raise ValueError(f"retrieval.encoder_dim ({dim}) must be divisible by retrieval.encoder_heads "
                             f"({heads}) into even head widths")
        self.resolved_layers(model.num_layers)
        self.resolved_sources()
        if not 0 <= self.retriever.layer < model.num_layers:
            raise ValueError(f"retrieval.retriever.layer must name a decoder block 0..{model.num_layers - 1}, "
                             f"got {self.retriever.layer}")
        if self.retriever.lr_scale < 0:
            raise ValueError(f"retrieval.retriever.lr_scale must be >= 0, got {self.retriever.lr_scale}")
        if self.retriever.dim < 0:
            raise ValueError(f"retrieval.retriever.dim must be >= 0 (0 = model.dim), got {self.retriever.dim}")
        if self.search.hops not in (1, 2):
            raise ValueError(f"retrieval.search.hops must be 1 or 2, got {self.search.hops}")
        if self.refresh.mode == "rerank" and self.search.hops == 2:
            raise ValueError("retrieval.refresh.mode=rerank re-orders one hop's candidates; use hops=1 or reindex")
        if self.retriever.kind == "learned" and self.retriever.input == "embedder" and self.search.hops == 2:
            raise ValueError("retrieval.search.hops=2 with retrieval.retriever.input=embedder would embed every chunk "
                             "joined with its neighbour with the frozen embedder at each refresh; use hops=1, or "
                             "retriever_input=tokens")
        if self.refresh.ef_search < 1:
            raise ValueError(f"retrieval.refresh.ef_search must be >= 1, got {self.refresh.ef_search}")
        if not 0.0 <= self.refresh.recall_floor <= 1.0:
            raise ValueError(f"retrieval.refresh.recall_floor must be in [0, 1], got {self.refresh.recall_floor}")
        if self.refresh.schedule or self.retriever.init == "scratch":
            if self.retriever.kind != "learned":
                raise ValueError("retrieval.refresh.schedule and retrieval.retriever.init=scratch need "
                                 "retrieval.retriever.kind=learned (a frozen retriever's neighbours never change)")

            resolved_lag(self.refresh.lag, parse_schedule(self.refresh.schedule))


FLAT_RETRIEVAL_KEYS = {
    "retriever": "retriever.kind", "retriever_init": "retriever.init", "retriever_input": "retriever.input",
    "retriever_layer": "retriever.layer", "retriever_dim": "retriever.dim", "retriever_lr_scale": "retriever.lr_scale",
    "relevance_beta": "retriever.relevance_beta", "refresh": "refresh.schedule", "refresh_lag": "refresh.lag",
    "refresh_index": "refresh.index", "refresh_mode": "refresh.mode", "refresh_ef_search": "refresh.ef_search",
    "refresh_recall_floor": "refresh.recall_floor", "embedder": "search.embedder", "sources": "search.sources",
    "hops": "search.hops",
}
"""The flat ``retrieval.X`` keys of runs and presets before the retrieval section was split, and their new homes.
They are still read (a run record or preset written before the split loads unchanged); ``--set`` with one logs a
one-line deprecation note naming the new key."""

DERIVED_RETRIEVAL_KEYS = ("retriever_input_dim",)
"""Flat keys that were values the trainer wrote into the config; they now live in the run record's ``derived``
section (see ``Derived``) and are dropped from a config read from an older run."""


def migrate_retrieval(values: dict[str, Any], warn: bool = False) -> dict[str, Any]:
    """A ``retrieval`` mapping with the flat keys of ``FLAT_RETRIEVAL_KEYS`` moved into their sections (a flat
    ``refresh`` or ``retriever`` holds a string; the sections hold mappings). ``warn`` logs each moved key."""
    out = {k: v for k, v in values.items() if k not in DERIVED_RETRIEVAL_KEYS}
    for old, new in FLAT_RETRIEVAL_KEYS.items():
        if old not in out or isinstance(out[old], dict):
            continue
        section, name = new.split(".")
        value = out.pop(old)
        if warn:
            logger.warning("retrieval.%s is deprecated: it is now retrieval.%s", old, new)
        target = out.setdefault(section, {})
        if not isinstance(target, dict):
            raise ValueError(f"retrieval.{section} is a section; give it a mapping, got {target!r}")
        target.setdefault(name, value)
    return out


@dataclass(frozen=True)
class Derived:
    """What a run derives from its datastore when training starts and records beside its config (the run record's
    ``derived`` section), instead of writing it into the config: the chunk size and embedder of the neighbours it
    trained on (the config may leave them 0 / empty for "the index's"), and the width of the frozen embedder's
    vectors a learned retriever reads (``retriever.input=embedder``), which sizes its projection."""

    chunk_size: int = 0
    embedder: str = ""
    retriever_input_dim: int = 0
    encoder_dim: int = 0
    """The neighbour encoder's width of a RETRO run recorded before ``retrieval.encoder_dim`` 0 meant a quarter of
    ``model.dim`` (it meant half): such a run keeps the encoder its weights were trained in. 0: the config's rule."""

    @classmethod
    def of_record(cls, record: dict[str, Any]) -> "Derived":
        """A run record's derived values; records written before ``derived`` existed held them in the config."""
        if "derived" in record and "encoder_dim" in record["derived"]:
            return cls(**record["derived"])
        flat = record["config"].get("retrieval", {})
        search = flat.get("search", {}) if isinstance(flat.get("search"), dict) else {}
        old = {"encoder_dim": 0}
        dim = record["config"].get("model", {}).get("dim")  # a run record holds every model field
        if flat.get("enabled") and not flat.get("encoder_dim") and dim:  # recorded when 0 meant half of model.dim
            old["encoder_dim"] = int(dim) // 2
        if "derived" in record:
            return cls(**record["derived"], **old)
        return cls(chunk_size=int(flat.get("chunk_size", 0)), embedder=search.get("embedder", flat.get("embedder", "")),
                   retriever_input_dim=int(flat.get("retriever_input_dim", 0)), **old)

    def apply(self, rcfg: RetrievalConfig) -> RetrievalConfig:
        """A copy of ``rcfg`` with the derived chunk size and embedder filled in: the config the model is built
        with and the neighbours are read by. ``rcfg`` itself is unchanged."""
        search = dataclasses.replace(rcfg.search, embedder=rcfg.search.embedder or self.embedder)
        return dataclasses.replace(rcfg, chunk_size=rcfg.chunk_size or self.chunk_size, search=search,
                                   encoder_dim=rcfg.encoder_dim or self.encoder_dim)
