"""The training loop: AdamW with warmup and cosine decay, gradient accumulation and clipping, optional bf16
autocast and ``torch.compile``, periodic evaluation, atomic checkpoints, exact resume and a clean stop on Ctrl-C.
For a Mixture-of-Experts model the weighted auxiliary losses join the cross-entropy in the backward pass, and
each metrics line also holds ``aux_loss`` and, per MoE layer, the expert load and dropped-token share.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from knnformer.config import Config, Derived, TrainConfig, parse_schedule, resolved_lag
from knnformer.data.datastore import Datastore
from knnformer.io import atomic_write_text
from knnformer.model.moe import StatsMeter
from knnformer.model.transformer import Transformer
from knnformer.run.batches import WindowSampler
from knnformer.run.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from knnformer.run.refreshes import changed_share, load_refresh, prune_refreshes, refresh_folder
from knnformer.run.vectors import frozen_vectors
from knnformer.runtime import autocast
from knnformer.train.optim import lr_at, make_optimizer, redraw_due, redraw_step
from knnformer.train.refresh import BackgroundRefresh, FinishedRefresh, refresh_due, refresh_neighbours

logger = logging.getLogger(__name__)


def sample_windows(data: np.ndarray, batch: int, context: int, generator: torch.Generator):
    """``batch`` random windows of ``context + 1`` tokens: inputs and targets, each (B, T) int64."""
    starts = torch.randint(len(data) - context, (batch,), generator=generator).numpy()
    windows = torch.from_numpy(data[starts[:, None] + np.arange(context + 1)].astype(np.int64))
    return windows[:, :-1], windows[:, 1:]


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


class StopRequested:
    """Turns the first Ctrl-C into a flag the loop checks between steps; a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: Ctrl-C is not ours to catch
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class TrainResult:
    step: int
    interrupted: bool
    last_loss: float
    valid: dict[str, float] = field(default_factory=dict)


def run_record(config: Config, datastore: Datastore, derived: Derived = Derived()) -> dict[str, Any]:
    """What a run saves beside its weights: its config, what training derived from the datastore, and the
    datastore it was trained on."""
    return {"config": config.to_dict(), "derived": dataclasses.asdict(derived),
            "datastore": {"path": str(Path(datastore.path).resolve()),
                          "corpus_sha256": datastore.manifest["corpus_sha256"],
                          "tokenizer_fingerprint": datastore.manifest["tokenizer"]["fingerprint"]}}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after ``step`` by a run that stopped without checkpointing them."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def resolve_retrieval(config: Config, datastore: Datastore):
    """The datastore's precomputed neighbours for a retrieval run (None for a plain LM). Fills in the chunk size
    and embedder the run then records, so evaluation can refuse neighbours built otherwise."""
    rcfg = config.retrieval
    if not rcfg.enabled:
        return None, Derived()
    from knnformer.retrieval.neighbours import load_neighbours

    neighbours = load_neighbours(datastore, rcfg.search.embedder or None, rcfg.chunk_size or None, config.model.context,
                                 rcfg.search.hops)
    derived = Derived(chunk_size=neighbours.chunk_size, embedder=rcfg.search.embedder or neighbours.info["embedder"])
    k = max(rcfg.num_neighbours, rcfg.eval_neighbours)
    if k > neighbours.k:
        raise ValueError(f"retrieval wants {k} neighbours per chunk but {datastore.path} holds {neighbours.k}; "
                         f"rebuild with `knnformer index {datastore.path} --k {k} --force`")
    derived.apply(rcfg).validate(config.model)
    return neighbours, derived


def train(run_dir: str | Path, datastore: Datastore, config: Config, resume: bool = False,
          on_step: Callable[[dict[str, Any]], None] | None = None, device: str = "cpu") -> TrainResult:
    """Train (or resume) the run in ``run_dir``; ``on_step`` receives each step's metrics for a progress bar."""
    run_dir = Path(run_dir)
    cfg, mcfg = config.train, config.model
    device = torch.device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_data = datastore.require_split("train", mcfg.context + 2)
    neighbours, derived = resolve_retrieval(config, datastore)
    rcfg = derived.apply(config.retrieval)  # the user's config with the neighbours' chunk size and embedder
    past = rcfg.enabled and "past" in rcfg.resolved_sources()
    frozen = frozen_vectors(datastore, rcfg) if rcfg.enabled else None  # a learned retriever reading the embedder
    if frozen is not None:
        derived = dataclasses.replace(derived, retriever_input_dim=int(frozen.shape[1]))
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
    token_bytes = torch.from_numpy(datastore.tokenizer.token_bytes)
    learned = neighbours is not None and rcfg.retriever.kind == "learned"
    schedule = parse_schedule(rcfg.refresh.schedule) if learned else []
    lag = resolved_lag(rcfg.refresh.lag, schedule) if learned else 0

    def refresh_needed(step: int) -> bool:
        return learned and ((step == 0 and rcfg.retriever.init == "scratch") or (step > 0 and refresh_due(step, schedule)))

    def use_neighbours(new) -> None:
        train_sampler.neighbours = new
        if valid_sampler is not None:
            valid_sampler.neighbours = new

    torch.manual_seed(cfg.seed)
    model = Transformer(mcfg, rcfg, derived.retriever_input_dim).to(device)
    optimizer = make_optimizer(model, cfg, rcfg.retriever.lr_scale)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    record = run_record(config, datastore, derived)
    if learned:
        record["refresh"] = {"id": 0, "step": 0, "folder": None}  # 0: the datastore's own neighbours
    pending = None  # a refresh started but not yet swapped in (refresh.BackgroundRefresh or FinishedRefresh)
    start_step = 0
    metrics_path = run_dir / "metrics.jsonl"
    if resume:
        ckpt = load_checkpoint(latest_checkpoint(run_dir), with_optimizer=True)
        model.load_state_dict(ckpt["weights"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step = ckpt["state"]["step"]
        generator.set_state(ckpt["state"]["generator"])
        set_rng_state(ckpt["state"]["rng"])
        if learned and ckpt["config"].get("refresh", {}).get("id"):  # the neighbours this checkpoint trained with
            record["refresh"] = ckpt["config"]["refresh"]
            neighbours = load_refresh(run_dir / record["refresh"]["folder"], datastore, neighbours.layout,
                                      rcfg.search.hops)
            use_neighbours(neighbours)
        if learned and ckpt["config"].get("refresh_pending"):  # started before the checkpoint, not yet swapped in
            p = record["refresh_pending"] = ckpt["config"]["refresh_pending"]
            pending = FinishedRefresh(run_dir / p["folder"], datastore, neighbours.layout, rcfg.search.hops, p["id"],
                                      p["step"], p["swap_step"])
        _truncate_metrics(metrics_path, start_step)
        logger.info("resumed from %s at step %d", ckpt["path"], start_step)
    else:
        if list_checkpoints(run_dir):
            raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or pick another --out")
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.unlink(missing_ok=True)
    atomic_write_text(run_dir / "config.json", json.dumps(record, indent=2))

    step_model = torch.compile(model) if cfg.compile else model
    model.train()
    meter = StatsMeter(model)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * mcfg.context

    def checkpoint(step: int) -> None:
        if pending is not None:  # a checkpoint names the pending refresh's folder, so that folder must exist
            pending.result()
        state = {"generator": generator.get_state(), "rng": rng_state()}
        save_checkpoint(run_dir, step, model, record, optimizer, state, keep=cfg.keep_checkpoints)
        if learned:  # refreshes no kept checkpoint (nor the run) reads any more give their arrays back
            records = [json.loads((c / "config.json").read_text()) for c in list_checkpoints(run_dir)] + [record]
            prune_refreshes(run_dir, {r[key]["folder"] for r in records for key in ("refresh", "refresh_pending")
                                      if (r.get(key) or {}).get("folder")})

    def swap_in(new, refresh_id: int, started: int) -> dict:
        """Serve ``new`` (refresh ``refresh_id``, computed from the weights before step ``started``) from now on."""
        nonlocal neighbours
        info = {"refresh": refresh_id, "refresh_changed": changed_share(neighbours, new),
                "refresh_recall": new.info["recall_at_10"], "refresh_started": started}
        neighbours = new
        use_neighbours(new)  # swapped between two steps: no batch ever mixes two refreshes
        record["refresh"] = {"id": refresh_id, "step": started,
                             "folder": str(refresh_folder(run_dir, refresh_id).relative_to(run_dir.resolve()))}
        record.pop("refresh_pending", None)
        atomic_write_text(run_dir / "config.json", json.dumps(record, indent=2))
        return info

    step, loss_value, valid = start_step, float("nan"), {}
    interrupted = False
    with StopRequested() as stop, open(metrics_path, "a") as metrics:
        t_last = time.perf_counter()
        while step < cfg.steps:
            refreshed = {}
            if pending is not None and step == pending.swap_step:
                t_wait = time.perf_counter()
                new = pending.result()  # waits only if the background refresh is not done yet
                refreshed = swap_in(new, pending.refresh_id, pending.step)
                refreshed["refresh_seconds"] = time.perf_counter() - t_wait
                refreshed["refresh_cpu_seconds"] = pending.cpu_seconds
                pending = None
                t_last = time.perf_counter()  # the pause is reported as refresh_seconds, not as throughput
            if refresh_needed(step) and (lag == 0 or step == 0 or step + lag < cfg.steps):
                t_refresh = time.perf_counter()
                refresh_id = record["refresh"]["id"] + 1
                kwargs = dict(index=rcfg.refresh.index, recall_floor=rcfg.refresh.recall_floor, seed=cfg.seed,
                              hops=rcfg.search.hops, ef_search=rcfg.refresh.ef_search, frozen=frozen,
                              mode=rcfg.refresh.mode)
                if lag and step > 0:  # in the background, swapped in before step + lag
                    pending = BackgroundRefresh(model, rcfg, neighbours, run_dir, refresh_id, step, step + lag,
                                                **kwargs)
                    record["refresh_pending"] = {
                        "id": refresh_id, "step": step, "swap_step": step + lag,
                        "folder": str(refresh_folder(run_dir, refresh_id).relative_to(run_dir.resolve()))}
                else:  # synchronous (and the step-0 refresh of a retriever from scratch: no neighbours before it)
                    t_cpu = time.process_time()
                    new = refresh_neighbours(model, neighbours, run_dir, refresh_id, step, **kwargs)
                    refreshed = swap_in(new, refresh_id, step)
                    refreshed["refresh_seconds"] = time.perf_counter() - t_refresh
                    refreshed["refresh_cpu_seconds"] = time.process_time() - t_cpu
                t_last = time.perf_counter()
            redrew = redraw_due(step, mcfg)
            if redrew:
                redraw_step(model, step, cfg.seed)
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            loss_sum, aux_sum = 0.0, 0.0
            meter.reset()
            for _ in range(cfg.grad_accum):
                batch = train_sampler.sample(cfg.batch_size, generator).to(device)
                with autocast(cfg.dtype, device):
                    _, loss = step_model(batch.x, batch.y, **batch.model_inputs())
                aux = model.aux_loss()
                ((loss if aux is None else loss + aux) / cfg.grad_accum).backward()
                loss_sum += loss.item()
                aux_sum += 0.0 if aux is None else aux.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = loss_sum / cfg.grad_accum
            now = time.perf_counter()
            row = {"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": tokens_per_step / (now - t_last)}
            t_last = now
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            if redrew:
                row["redraw"] = True
            row.update(refreshed)
            if meter.layers:
                row["aux_loss"] = aux_sum / cfg.grad_accum
                row["moe"] = meter.summary()
            if valid_sampler is not None and cfg.eval_interval and (step % cfg.eval_interval == 0 or step == cfg.steps):
                valid = estimate_loss(model, valid_sampler, token_bytes, cfg, device)
                row.update(valid)
                t_last = time.perf_counter()  # evaluation time is not training throughput
            if step % cfg.log_interval == 0 or "valid_loss" in row or "redraw" in row or "refresh" in row or step == cfg.steps:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            if on_step is not None:
                on_step(row)
            if step % cfg.checkpoint_interval == 0 or step == cfg.steps:
                checkpoint(step)
            if stop.requested:
                if step % cfg.checkpoint_interval and step != cfg.steps:
                    checkpoint(step)
                interrupted = True
                break
    meter.close()
    return TrainResult(step, interrupted, loss_value, valid)
