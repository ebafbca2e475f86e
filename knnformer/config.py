"""The typed configuration: dataclasses are the schema.

Resolution order: dataclass defaults, then one preset YAML file, then ``--set section.field=value``
overrides. Unknown keys and values of the wrong type raise ``ValueError`` naming the key.
Only the CLI sees the whole ``Config``; every other module takes its own section.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

logger = logging.getLogger(__name__)

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

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class PerformerConfig:
    """FAVOR+ attention (``model.attention: performer``); see performer.py."""

    num_features: int = 256
    """Random features per head (M); the approximation of softmax attention tightens as M grows."""
    redraw_interval: int = 1000
    """The trainer draws new random features every this many optimizer steps; 0 keeps the first draw."""
    chunk_size: int = 128
    """Tokens per chunk of the causal prefix sums: memory holds one (M, Dh) state per chunk, not per token."""

    def validate(self) -> None:
        for name in ("num_features", "chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.performer.{name} must be positive, got {getattr(self, name)}")
        if self.redraw_interval < 0:
            raise ValueError(f"model.performer.redraw_interval must be >= 0 (0 = never), got {self.redraw_interval}")


@dataclass
class MoEConfig:
    """The Mixture-of-Experts feed-forward (used where ``model.ffn`` is ``moe``); see moe.py."""

    num_experts: int = 8
    """Experts per MoE layer (E)."""
    router: Literal["top2", "top1", "expert_choice"] = "top2"
    """``top2``: GShard (each token to its two best experts, the second kept with probability 2 x its normalised
    gate in training); ``top1``: Switch; ``expert_choice``: each expert takes its best-scoring tokens of the batch
    (Zhou et al. 2022; not causal: a token's experts depend on the other tokens of the batch, later ones too)."""
    capacity_factor: float = 1.25
    """Training capacity: each expert holds ceil(factor x k x tokens / E) tokens, with k = 1 (top1) or 2 (top2);
    over capacity, a token's assignment is dropped and it passes through the residual. For ``expert_choice`` it is
    the average number of experts per token: each expert takes ceil(factor x tokens / E)."""
    eval_capacity_factor: float = 0.0
    """Capacity at evaluation and generation; 0 means no token is dropped (top1 / top2: each expert takes every
    token routed to it, so a token's output never depends on the rest of the batch) and, for ``expert_choice``,
    the training factor."""
    every: int = 1
    """MoE in every ``every``-th block (the blocks i with i % every == every - 1); the others are dense. 2 is
    GShard's and Switch's every other layer."""
    expert_hidden: int = 0
    """Hidden width of each expert's SwiGLU; 0 means the dense FFN's (``model.ffn_hidden``'s rule)."""
    aux_loss_weight: float = 0.01
    """Weight of GShard's load-balancing loss E x sum_e f_e P_e (f_e: share of tokens whose first choice is e,
    P_e: mean router probability of e), added to the training loss for every MoE layer (not for ``expert_choice``,
    balanced by construction)."""
    z_loss_weight: float = 0.0
    """Weight of the router z-loss (ST-MoE): mean squared logsumexp of the router logits."""
    router_noise: float = 0.0
    """Switch's router jitter: in training the router's input is multiplied by uniform noise in [1 - eps, 1 + eps]."""
    grouped_mm: bool = True
    """``top1`` / ``top2`` on CPU: run the experts as grouped GEMMs (``torch._grouped_mm``) over exactly the kept
    tokens; off (and on other devices, and under ``torch.compile``) as ``bmm`` over a buffer padded to the
    capacity. Same result."""
    second_expert_sampling: bool = True
    """``top2`` only: in training keep the second expert with probability 2 x its normalised gate (GShard); off
    keeps it always. Evaluation always keeps it."""

    def validate(self) -> None:
        if self.num_experts <= 0:
            raise ValueError(f"model.moe.num_experts must be positive, got {self.num_experts}")
        if self.router == "top2" and self.num_experts < 2:
            raise ValueError("model.moe.router=top2 needs model.moe.num_experts >= 2; use top1 for one expert")
        if self.capacity_factor <= 0 or self.eval_capacity_factor < 0:
            raise ValueError(f"model.moe.capacity_factor must be > 0 and model.moe.eval_capacity_factor >= 0 "
                             f"(got {self.capacity_factor}, {self.eval_capacity_factor})")
        if self.every <= 0 or self.expert_hidden < 0:
            raise ValueError(f"model.moe.every must be positive and model.moe.expert_hidden >= 0 "
                             f"(got {self.every}, {self.expert_hidden})")
        if self.aux_loss_weight < 0 or self.z_loss_weight < 0:
            raise ValueError("model.moe.aux_loss_weight and model.moe.z_loss_weight must be >= 0")
        if not 0.0 <= self.router_noise < 1.0:
            raise ValueError(f"model.moe.router_noise must be in [0, 1), got {self.router_noise}")


@dataclass
class ModelConfig:
    vocab_size: int = 0
    """Size of the token vocabulary; 0 means "take it from the datastore's tokenizer"."""
    context: int = 256
    """Number of tokens the model attends over (its block size)."""
    num_layers: int = 6
    """Number of decoder blocks."""
    num_heads: int = 6
    """Attention heads per block; ``dim`` must be divisible by it."""
    dim: int = 384
    """Width of the residual stream."""
    ffn_hidden: int = 0
    """Hidden width of the SwiGLU feed-forward; 0 means 8/3 * dim rounded up to a multiple of 32."""
    dropout: float = 0.0
    """Dropout on attention outputs and the residual branches during training."""
    rope_theta: float = 10000.0
    """Base of the rotary position frequencies."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""
    init_std: float = 0.02
    """Standard deviation of the weight initialisation."""
    attention: Literal["softmax", "performer"] = "softmax"
    """``softmax``: exact attention (SDPA). ``performer``: FAVOR+ random-feature attention, linear in the length."""
    performer: PerformerConfig = field(default_factory=PerformerConfig)
    """Settings of ``attention: performer``; ignored by softmax attention."""
    causal: bool = True
    """Each position attends to itself and the positions before it (a decoder); False attends both ways (an
    encoder, such as the Long Range Arena classifier), which cannot generate."""
    ffn: Literal["dense", "moe"] = "dense"
    """Feed-forward of the blocks: one SwiGLU (``dense``) or a Mixture-of-Experts of SwiGLUs (``moe``, see
    ``model.moe``)."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """The Mixture-of-Experts settings; read only when ``ffn`` is ``moe``."""

    def resolved_ffn_hidden(self) -> int:
        if self.ffn_hidden > 0:
            return self.ffn_hidden
        return 32 * -(-(8 * self.dim // 3) // 32)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block ``layer`` (0-based) has a Mixture-of-Experts feed-forward."""
        return self.ffn == "moe" and layer % self.moe.every == self.moe.every - 1

    def validate(self) -> None:
        for name in ("context", "num_layers", "num_heads", "dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"model.dim ({self.dim}) must be divisible by model.num_heads ({self.num_heads})")
        if (self.dim // self.num_heads) % 2:
            raise ValueError("model.dim / model.num_heads must be even for rotary positions")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        self.performer.validate()
        self.moe.validate()
        if self.ffn == "moe" and self.moe.every > self.num_layers:
            raise ValueError(f"model.moe.every ({self.moe.every}) leaves no MoE layer among "
                             f"{self.num_layers} layers")


@dataclass
class TrainConfig:
    steps: int = 2000
    """Number of optimizer steps."""
    batch_size: int = 12
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches accumulated into one optimizer step."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 100
    """Linear warmup steps from 0 to ``lr``."""
    decay_steps: int = 0
    """Steps of cosine decay after which the rate stays at ``min_lr``; 0 means ``steps``."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not norms)."""
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """``bfloat16`` runs forward and backward under bf16 autocast; weights and optimizer stay fp32."""
    compile: bool = False
    """Compile the model with ``torch.compile`` (faster steps after a one-off compile time)."""
    seed: int = 1337
    """Seeds the initialisation and the sampling of training windows."""
    eval_interval: int = 250
    """Evaluate on valid every this many steps (and at the end); 0 disables."""
    eval_batches: int = 20
    """Batches of random valid windows per periodic evaluation (``evaluate`` scores the whole split)."""
    checkpoint_interval: int = 500
    """Save a checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep on disk."""
    log_interval: int = 10
    """Append a metrics line every this many steps."""
    threads: int = 0
    """Torch intra-op threads; 0 leaves torch's default."""

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_interval", "keep_checkpoints", "log_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"train.lr must be > 0 and 0 <= train.min_lr <= train.lr (got {self.lr}, {self.min_lr})")
        if self.warmup_steps < 0 or self.eval_interval < 0 or self.decay_steps < 0:
            raise ValueError("train.warmup_steps, train.eval_interval and train.decay_steps must be >= 0")


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


@dataclass
class RetrievalConfig:
    """RETRO's architecture (the fields here), then the retriever, its refreshes and the search as sections."""

    enabled: bool = False
    """Train and evaluate with RETRO chunked cross-attention to neighbours precomputed by ``knnformer index``."""
    chunk_size: int = 0
    """Tokens per chunk (C); must divide ``model.context``; 0 takes the chunk size the index was built with."""
    num_neighbours: int = 2
    """Neighbours (K) each chunk attends to in training."""
    eval_neighbours: int = 0
    """Neighbours each chunk attends to at evaluation; 0 means ``num_neighbours``."""
    layers: str = "auto"
    """Decoder layers (0-based, comma-separated) followed by chunked cross-attention; ``auto`` = RETRO's rule
    scaled to the depth: every third layer from the middle one (layer 2 of 4, 3 of 6, 4 and 7 of 8, 6 and 9 of 12)."""
    encoder_layers: int = 1
    """Blocks of the bidirectional neighbour encoder."""
    encoder_dim: int = 0
    """Width of the neighbour encoder; 0 means half of ``model.dim``."""
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

    def resolved_encoder(self, model: ModelConfig) -> tuple[int, int]:
        """(width, heads) of the neighbour encoder."""
        dim = self.encoder_dim or model.dim // 2
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

    def validate(self, model: ModelConfig) -> None:
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


def retrieval_config(**values: Any) -> RetrievalConfig:
    """A ``RetrievalConfig`` from keyword values, flat (old) keys accepted: ``retrieval_config(enabled=True,
    retriever="learned", refresh="0-:10")``. Not validated against a model (``Config.validate`` does that)."""
    config = RetrievalConfig()
    _merge(config, migrate_retrieval(values), "retrieval.")
    return config


@dataclass(frozen=True)
class Derived:
    """What a run derives from its datastore when training starts and records beside its config (the run record's
    ``derived`` section), instead of writing it into the config: the chunk size and embedder of the neighbours it
    trained on (the config may leave them 0 / empty for "the index's"), and the width of the frozen embedder's
    vectors a learned retriever reads (``retriever.input=embedder``), which sizes its projection."""

    chunk_size: int = 0
    embedder: str = ""
    retriever_input_dim: int = 0

    @classmethod
    def of_record(cls, record: dict[str, Any]) -> "Derived":
        """A run record's derived values; records written before ``derived`` existed held them in the config."""
        if "derived" in record:
            return cls(**record["derived"])
        flat = record["config"].get("retrieval", {})
        search = flat.get("search", {}) if isinstance(flat.get("search"), dict) else {}
        return cls(chunk_size=int(flat.get("chunk_size", 0)), embedder=search.get("embedder", flat.get("embedder", "")),
                   retriever_input_dim=int(flat.get("retriever_input_dim", 0)))

    def apply(self, rcfg: RetrievalConfig) -> RetrievalConfig:
        """A copy of ``rcfg`` with the derived chunk size and embedder filled in: the config the model is built
        with and the neighbours are read by. ``rcfg`` itself is unchanged."""
        search = dataclasses.replace(rcfg.search, embedder=rcfg.search.embedder or self.embedder)
        return dataclasses.replace(rcfg, chunk_size=rcfg.chunk_size or self.chunk_size, search=search)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()
        self.retrieval.validate(self.model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a dataclass field's annotation, converting ints to floats where allowed."""
    origin = typing.get_origin(annotation)
    if isinstance(value, str) and annotation in (int, float):
        try:  # YAML 1.1 reads "1e-3" as a string
            value = annotation(value)
        except ValueError:
            pass
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ValueError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # YAML reads "layers=2" as a number
            return str(value)
    else:  # pragma: no cover - schema error, not user error
        raise AssertionError(f"unsupported annotation {annotation} for {key}")
    raise ValueError(f"{key} must be of type {annotation.__name__}; got {value!r} ({type(value).__name__})")


def _merge(obj: Any, values: dict[str, Any], prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ValueError(f"unknown config key {dotted!r} (known: {', '.join(sorted(prefix + n for n in names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config key {dotted!r} is a section; give it a mapping, got {value!r}")
            _merge(current, value, dotted + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted))


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build a validated Config from a nested mapping (a preset or a saved ``config.json``)."""
    values = dict(values or {})
    if isinstance(values.get("retrieval"), dict):
        values["retrieval"] = migrate_retrieval(values["retrieval"])
    config = Config()
    _merge(config, values, "")
    config.validate()
    return config


def resolve_preset(name_or_path: str) -> Path:
    """A preset is a YAML path, or the name of a file in the package's ``configs/`` folder."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = PRESET_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if candidate.exists():
        return candidate
    known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise ValueError(f"no config preset {name_or_path!r}: give a .yaml path or one of: {known}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.field=value``; the value is read as YAML (so 500, 1e-3, true and bfloat16 all work)."""
    if "=" not in text:
        raise ValueError(f"--set expects section.field=value, got {text!r}")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"--set key must be a dotted path such as train.steps, got {key!r}")
    if len(parts) == 2 and parts[0] == "retrieval" and parts[1] in FLAT_RETRIEVAL_KEYS:
        new = FLAT_RETRIEVAL_KEYS[parts[1]]
        logger.warning("--set retrieval.%s is deprecated: use retrieval.%s", parts[1], new)
        parts = ["retrieval", *new.split(".")]
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def load_config(preset: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the preset file, then the dotted overrides; validated."""
    values: dict[str, Any] = {}
    if preset is not None:
        path = resolve_preset(preset)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config preset {path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config preset {path} must be a mapping of sections")
        values = loaded
    return config_from_dict(apply_overrides(values, overrides))


def apply_overrides(values: dict[str, Any], overrides: list[str] = (), strict: bool = False) -> dict[str, Any]:
    """Set each ``section.field=value`` override (``--set``) in a nested mapping of config values, in order, and
    return the mapping (changed in place). A section missing from ``values`` is created, unless ``strict``: then
    ``values`` is a whole saved config and a path through a missing section or a field names an unknown key.
    Unknown fields are left for the dataclass merge to name (``config_from_dict``, ``merge_config``)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = values
        for part in parts[:-1]:
            if strict and (part not in node or not isinstance(node[part], dict)):
                raise ValueError(f"unknown config key {'.'.join(parts)!r}")
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {text!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return values


def merge_config(config: Any, values: dict[str, Any]) -> Any:
    """Merge a nested mapping into a config dataclass (any, such as the LRA experiment's), checking each key and
    value against its fields as ``config_from_dict`` does; returns ``config``, not validated."""
    _merge(config, values, "")
    return config
