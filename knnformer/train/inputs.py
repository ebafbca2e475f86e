"""What a run trains and evaluates on: the datastore's precomputed neighbours for a retrieval run
(``resolve_retrieval``), the train and valid window samplers built over them (``make_samplers``), the periodic
validation loss on fixed windows (``estimate_loss``) and plain random windows without retrieval
(``sample_windows``, for benchmarks).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from knnformer.config import Config, Derived, TrainConfig
from knnformer.data.datastore import Datastore
from knnformer.retrieval.neighbours import Neighbours, load_neighbours
from knnformer.run.batches import WindowSampler
from knnformer.runtime import autocast

logger = logging.getLogger(__name__)


def sample_windows(data: np.ndarray, batch: int, context: int, generator: torch.Generator):
    """``batch`` random windows of ``context + 1`` tokens: inputs and targets, each (B, T) int64."""
    starts = torch.randint(len(data) - context, (batch,), generator=generator).numpy()
    windows = torch.from_numpy(data[starts[:, None] + np.arange(context + 1)].astype(np.int64))
    return windows[:, :-1], windows[:, 1:]


def resolve_retrieval(config: Config, datastore: Datastore) -> tuple[Neighbours | None, Derived]:
    """The datastore's precomputed neighbours for a retrieval run (None for a plain LM), and what the run derives
    from them (their chunk size and embedder, recorded in the run record so evaluation can refuse neighbours built
    otherwise; the config itself is not changed)."""
    rcfg = config.retrieval
    if not rcfg.enabled:
        return None, Derived()
    if rcfg.search.databases:
        return database_inputs(config, datastore)
    neighbours = load_neighbours(datastore, rcfg.search.embedder or None, rcfg.chunk_size or None, config.model.context,
                                 rcfg.search.hops)
    derived = Derived(chunk_size=neighbours.chunk_size, embedder=rcfg.search.embedder or neighbours.info["embedder"])
    k = max(rcfg.num_neighbours, rcfg.eval_neighbours)
    if k > neighbours.k:
        raise ValueError(f"retrieval wants {k} neighbours per chunk but {datastore.path} holds {neighbours.k}; "
                         f"rebuild with `knnformer index {datastore.path} --k {k} --force`")
    derived.apply(rcfg).validate(config.model)
    return neighbours, derived


def database_inputs(config: Config, datastore: Datastore) -> tuple[Neighbours, Derived]:
    """RETRO trained against retrieval databases (``retrieval.search.databases``): every train and valid chunk's
    neighbours searched in them under the leakage rules (no copy of a held-out document, no copy of a train chunk's
    own document), computed once at the start of training (and of each resume)."""
    from knnformer.retrieval.database import database_neighbours, open_databases

    rcfg = config.retrieval
    if rcfg.retriever.kind == "learned" or "past" in rcfg.resolved_sources() or rcfg.search.hops != 1:
        raise ValueError("retrieval.search.databases reads the databases through the frozen embedder they were "
                         "indexed with: one hop, train sources, a frozen retriever")
    dbs = open_databases(rcfg.search.databases.split(","), datastore.manifest["tokenizer"]["fingerprint"],
                         rcfg.chunk_size or None, f"datastore {datastore.path}")
    excluded = dbs.filter_against(datastore)
    logger.info("retrieval databases: %d chunks; excluded %d documents that copy held-out ones", dbs.num_chunks,
                excluded["documents"])
    k = max(rcfg.num_neighbours, rcfg.eval_neighbours)
    neighbours = database_neighbours(dbs, datastore, ("train", "valid"), k)
    derived = Derived(chunk_size=dbs.chunk_size, embedder=rcfg.search.embedder or neighbours.info["embedder"])
    derived.apply(rcfg).validate(config.model)
    return neighbours, derived


def make_samplers(config: Config, datastore: Datastore, train_data: np.ndarray, neighbours,
                  frozen: np.ndarray | None) -> tuple[WindowSampler, WindowSampler | None]:
    """The train sampler and the valid one (None when the valid split is shorter than one window: periodic
    evaluation is then off). ``frozen``: the embedder's vectors a learned retriever reads, or None."""
    cfg, mcfg, rcfg = config.train, config.model, config.retrieval
    past = rcfg.enabled and "past" in rcfg.resolved_sources()
    train_sampler = WindowSampler(train_data, mcfg.context, neighbours, "train", rcfg.num_neighbours,
                                  rcfg.continuation, past, frozen)
    valid_data = datastore.split_tokens("valid")
    valid_sampler = None
    if len(valid_data) >= mcfg.context + 2:
        valid_sampler = WindowSampler(valid_data, mcfg.context, neighbours, "valid",
                                      rcfg.eval_neighbours or rcfg.num_neighbours, rcfg.continuation, past, frozen)
    elif cfg.eval_interval:
        logger.warning("valid split has %d tokens, too few for a window of %d: periodic evaluation is off",
                       len(valid_data), mcfg.context + 1)
    return train_sampler, valid_sampler


@torch.no_grad()
def estimate_loss(model, sampler: WindowSampler, token_bytes: torch.Tensor, cfg: TrainConfig,
                  device: torch.device) -> dict[str, float]:
    """Mean loss and bits per byte on ``eval_batches`` random windows, the same windows every time."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(cfg.seed + 2)
    nll, count, num_bytes = 0.0, 0, 0
    for _ in range(cfg.eval_batches):
        batch = sampler.sample(cfg.batch_size, generator).to(device)
        with autocast(cfg.dtype, device):
            _, loss = model(batch.x, batch.y, **batch.model_inputs())
        nll += loss.item() * batch.y.numel()
        count += batch.y.numel()
        num_bytes += int(token_bytes[batch.y.cpu()].sum())
    model.train(was_training)
    return {"valid_loss": nll / count, "valid_bpb": nll / math.log(2) / max(1, num_bytes)}
