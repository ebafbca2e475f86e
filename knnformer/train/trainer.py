"""The training loop: AdamW with warmup and cosine decay, gradient accumulation and clipping, optional bf16
autocast and ``torch.compile``, periodic evaluation, atomic checkpoints, exact resume and a clean stop on Ctrl-C.
For a Mixture-of-Experts model the weighted auxiliary losses join the cross-entropy in the backward pass, and
each metrics line also holds ``aux_loss`` and, per MoE layer, the expert load and dropped-token share.

``train()`` builds a ``Trainer`` (data, model, optimizer), starts it fresh or resumes it from the run's latest
checkpoint, and runs it. Each step the trainer first swaps in or starts the retriever refreshes that are due
(none for a plain run; in line, or in the background with a lag: see refresh.py), then takes one optimizer step,
writes the metrics line, evaluates and checkpoints when due.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from knnformer.config import Config, Derived, parse_schedule, resolved_lag
from knnformer.data.datastore import Datastore
from knnformer.io import atomic_write_text
from knnformer.model.moe import StatsMeter
from knnformer.model.transformer import Transformer
from knnformer.run.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_optimizer,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from knnformer.run.plots import write_curves
from knnformer.run.refreshes import changed_share, load_refresh, prune_refreshes, refresh_folder
from knnformer.run.vectors import frozen_vectors
from knnformer.runtime import autocast, choose_dtype
from knnformer.train import parallel
from knnformer.train.init import load_decoder
from knnformer.train.inputs import estimate_loss, make_samplers, resolve_retrieval
from knnformer.train.optim import lr_at, make_optimizer, redraw_due, redraw_step
from knnformer.train.refresh import BackgroundRefresh, FinishedRefresh, refresh_due, refresh_neighbours
from knnformer.train.stop import StopRequested
from knnformer.train.tensorboard import TensorBoard

logger = logging.getLogger(__name__)



@dataclass
class TrainResult:
    """How a call of ``train`` ended: the step reached, whether Ctrl-C stopped it, the last step's loss and the
    last periodic evaluation ({} if none ran)."""

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


def _last_wall_s(path: Path) -> float:
    """The ``wall_s`` of the last metrics line (0 if none), where a resumed run's clock goes on from."""
    lines = path.read_text().splitlines() if path.exists() else []
    return float(json.loads(lines[-1]).get("wall_s", 0.0)) if lines else 0.0


@dataclass
class StepStats:
    """What one optimizer step reports in its metrics line."""

    lr: float
    loss: float  # the cross-entropy, averaged over the accumulated micro-batches
    aux_loss: float  # the MoE auxiliary losses, likewise (0 without MoE)
    grad_norm: torch.Tensor | None  # before clipping; None when clipping is off
    redrew: bool  # the step started with new Performer features


class Trainer:
    """One run in ``run_dir``: ``__init__`` builds the samplers, model and optimizer; ``start`` begins a new run or
    resumes the latest checkpoint; ``run`` trains until ``config.train.steps`` or Ctrl-C. ``self.step`` counts the
    optimizer steps taken; ``self.record`` is the run record saved as ``config.json`` and in every checkpoint."""

    def __init__(self, run_dir: str | Path, datastore: Datastore, config: Config,
                 on_step: Callable[[dict[str, Any]], None] | None = None, device: str | None = None):
        self.run_dir, self.datastore, self.config = Path(run_dir), datastore, config
        self.cfg, self.mcfg = config.train, config.model
        self.on_step = on_step
        # the ranks torchrun started (one when run alone), this rank's device and the precision it runs fast
        self.world, self.device = parallel.start(device or self.cfg.device)
        self.dtype, self.dtype_reason = choose_dtype(self.cfg.dtype, self.device)
        if self.cfg.batch_size % self.world.size:
            raise ValueError(f"train.batch_size ({self.cfg.batch_size}) is the global micro-batch and must be "
                             f"divisible by the {self.world.size} ranks")
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        self._setup_data()
        if self.world.size > 1 and self.schedule and self.mcfg.ffn == "moe" and self.mcfg.moe.expert_parallel:
            raise ValueError("retrieval.refresh (a learned retriever's re-indexing) runs the whole model on rank 0: "
                             "train it without model.moe.expert_parallel")
        if self.world.size > 1 and self.schedule and self.cfg.parallel == "fsdp":
            raise ValueError("retrieval.refresh (a learned retriever's re-indexing) reads whole weights: train it "
                             "with train.parallel=ddp or one process")
        self._setup_model()
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.pending = None  # a refresh started but not yet swapped in (refresh.BackgroundRefresh or FinishedRefresh)
        self.step, self.last_loss, self.valid = 0, float("nan"), {}
        self._t_last = time.perf_counter()  # end of the last timed step: what tokens_per_s is measured from
        self.wall_before = 0.0  # seconds the run trained before this process (a resume): metrics' wall_s goes on

    # --- setup -------------------------------------------------------------------------------------------------

    def _setup_data(self) -> None:
        """Training windows, the neighbours of a retrieval run, the samplers and the refresh schedule."""
        train_data = self.datastore.require_split("train", self.mcfg.context + 2)
        self.neighbours, self.derived = resolve_retrieval(self.config, self.datastore)
        # the config's retrieval section with the neighbours' chunk size and embedder filled in (a copy)
        rcfg = self.rcfg = self.derived.apply(self.config.retrieval)
        # the embedder's vectors of every chunk, for a learned retriever that reads them (None otherwise)
        self.frozen = frozen_vectors(self.datastore, rcfg) if rcfg.enabled else None
        if self.frozen is not None:
            self.derived = dataclasses.replace(self.derived, retriever_input_dim=int(self.frozen.shape[1]))
        self.train_sampler, self.valid_sampler = make_samplers(self.config, self.datastore, train_data,
                                                               self.neighbours, self.frozen)
        self.token_bytes = torch.from_numpy(self.datastore.tokenizer.token_bytes)
        self.learned = self.neighbours is not None and rcfg.retriever.kind == "learned"
        self.schedule = parse_schedule(rcfg.refresh.schedule) if self.learned else []
        self.lag = resolved_lag(rcfg.refresh.lag, self.schedule) if self.learned else 0

    def _setup_model(self) -> None:
        """The model (seeded), its optimizer, the batch generator and the run record."""
        torch.manual_seed(self.cfg.seed)
        self.model = Transformer(self.mcfg, self.rcfg, self.derived.retriever_input_dim).to(self.device)
        if self.world.size > 1:  # the same initial weights everywhere, different dropout masks per rank
            torch.manual_seed(self.cfg.seed + 7919 * self.world.rank)
        # what the step calls: the model itself, or under DDP / FSDP2 (which shards the model: optimizer after)
        self.step_model = parallel.wrap(self.model, self.cfg, self.world, self.device)
        self.optimizer = make_optimizer(self.model, self.cfg, self.rcfg.retriever.lr_scale)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == "float16")
        self.generator = torch.Generator().manual_seed(self.cfg.seed + 1)
        self.record = run_record(self.config, self.datastore, self.derived)
        if self.learned:
            self.record["refresh"] = {"id": 0, "step": 0, "folder": None}  # 0: the datastore's own neighbours
        self.record["runtime"] = {"device": str(self.device), "dtype": self.dtype, "dtype_reason": self.dtype_reason,
                                  "world_size": self.world.size, "parallel": parallel.resolved_parallel(self.cfg,
                                                                                                         self.world),
                                  "threads": torch.get_num_threads()}

    def start(self, resume: bool) -> None:
        """Resume the latest checkpoint in ``run_dir``, or begin a new run there (refused if it holds one)."""
        if resume:
            self._resume()
        else:
            if list_checkpoints(self.run_dir):
                raise ValueError(f"{self.run_dir} already holds a run; pass --resume to continue it or pick "
                                 f"another --out")
            parallel.barrier()  # every rank has looked before rank 0 writes
            if self.world.main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.metrics_path.unlink(missing_ok=True)
        self._write_record()

    def _resume(self) -> None:
        """Weights, optimizer, step and generators of the latest checkpoint, and the neighbours it trained with
        (and a refresh it left pending); metric lines it did not reach are dropped."""
        path = latest_checkpoint(self.run_dir)
        distributed = parallel.is_distributed_checkpoint(path)
        ckpt = load_checkpoint(path, with_optimizer=not distributed)
        if distributed:  # saved by a sharded run: DCP reshards it onto this world size
            parallel.load_distributed(path, self.model, self.optimizer)
        else:
            with parallel.whole_experts(self.model, self.optimizer, self.world):  # sharded experts: load all, keep ours
                load_weights(self.model, ckpt)  # a model of another shape: a one-line error, not a traceback
                load_optimizer(self.optimizer, ckpt)
        self.step = ckpt["state"]["step"]
        self.generator.set_state(ckpt["state"]["generator"])
        set_rng_state(ckpt["state"]["rng"])
        saved = ckpt["config"]
        if self.learned and saved.get("refresh", {}).get("id"):  # the neighbours this checkpoint trained with
            self.record["refresh"] = saved["refresh"]
            self._use_neighbours(load_refresh(self.run_dir / self.record["refresh"]["folder"], self.datastore,
                                              self.neighbours.layout, self.rcfg.search.hops))
        if self.learned and saved.get("refresh_pending"):  # started before the checkpoint, not yet swapped in
            p = self.record["refresh_pending"] = saved["refresh_pending"]
            self.pending = FinishedRefresh(self.run_dir / p["folder"], self.datastore, self.neighbours.layout,
                                           self.rcfg.search.hops, p["id"], p["step"], p["swap_step"])
        if self.world.main:  # another rank's rewrite would swap the file under rank 0's appends
            _truncate_metrics(self.metrics_path, self.step)
        self.wall_before = _last_wall_s(self.metrics_path)
        logger.info("resumed from %s at step %d", ckpt["path"], self.step)

    def _write_record(self) -> None:
        if not self.world.main:
            return
        atomic_write_text(self.run_dir / "config.json", json.dumps(self.record, indent=2))

    # --- the loop ----------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train from ``self.step`` to ``config.train.steps``; the first Ctrl-C stops after the current step with a
        checkpoint."""
        cfg = self.cfg
        self.step_model = torch.compile(self.step_model) if cfg.compile else self.step_model
        self.model.train()
        self.meter = StatsMeter(self.model)
        interrupted = False
        with StopRequested() as stop, open(self.metrics_path if self.world.main else os.devnull, "a") as metrics:
            self._t_last = self._t_start = time.perf_counter()
            while self.step < cfg.steps:
                refreshed = self.refresh_before_step()
                row = self.metrics_row(self.train_step(), refreshed)
                if self._evaluation_due():
                    self.valid = estimate_loss(self.model, self.valid_sampler, self.token_bytes, cfg, self.device)
                    row.update(self.valid)
                    self._t_last = time.perf_counter()  # evaluation time is not training throughput
                self._log(row, metrics)
                checkpointed = self._checkpoint_due()
                if checkpointed:
                    self.checkpoint()
                if stop.requested if self.world.size == 1 else parallel.sum_over_ranks([stop.requested])[0]:
                    if not checkpointed:
                        self.checkpoint()
                    interrupted = True
                    break
        self.meter.close()
        return TrainResult(self.step, interrupted, self.last_loss, self.valid)

    def train_step(self) -> StepStats:
        """Optimizer step ``self.step``: new Performer features if due, the scheduled learning rate, gradients
        accumulated over ``grad_accum`` micro-batches, clipping, the update; advances ``self.step``."""
        cfg, step, model = self.cfg, self.step, self.model
        redrew = redraw_due(step, self.mcfg)
        if redrew:
            redraw_step(model, step, cfg.seed)
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss_sum, aux_sum = 0.0, 0.0
        self.meter.reset()
        for micro in range(cfg.grad_accum):
            # every rank draws the global micro-batch and keeps its slice (parallel.shard_batch)
            batch = parallel.shard_batch(self.train_sampler.sample(cfg.batch_size, self.generator), self.world)
            batch = batch.to(self.device)
            with parallel.accumulating(self.step_model, last=micro == cfg.grad_accum - 1):
                with autocast(self.dtype, self.device):
                    _, loss = self.step_model(batch.x, batch.y, **batch.model_inputs())
                aux = model.aux_loss()
                self.scaler.scale((loss if aux is None else loss + aux) / cfg.grad_accum).backward()
            loss_sum += loss.item()
            aux_sum += 0.0 if aux is None else aux.item()
        if self.world.size > 1:  # the step's loss is the mean over the global batch
            loss_sum, aux_sum = (v / self.world.size for v in parallel.sum_over_ranks([loss_sum, aux_sum]))
        self.scaler.unscale_(self.optimizer)
        grad_norm = parallel.clip_grad_norm(model, cfg.grad_clip) if cfg.grad_clip else None  # experts: every rank's
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.last_loss = loss_sum / cfg.grad_accum
        return StepStats(lr, self.last_loss, aux_sum / cfg.grad_accum, grad_norm, redrew)

    def metrics_row(self, stats: StepStats, refreshed: dict[str, Any]) -> dict[str, Any]:
        """The metrics line of the step just taken: loss, learning rate, throughput since the last timed step, and
        what applies (gradient norm, a Performer redraw, a refresh swapped in before it, MoE statistics)."""
        now = time.perf_counter()
        tokens_per_step = self.cfg.batch_size * self.cfg.grad_accum * self.mcfg.context
        row = {"step": self.step, "loss": stats.loss, "lr": stats.lr,
               "tokens_per_s": tokens_per_step / (now - self._t_last), "wall_s": self.wall_before + now - self._t_start}
        self._t_last = now
        if stats.grad_norm is not None:
            row["grad_norm"] = float(stats.grad_norm)
        if stats.redrew:
            row["redraw"] = True
        row.update(refreshed)
        if self.meter.layers:
            row["aux_loss"] = stats.aux_loss
            row["moe"] = self.meter.summary()
        return row

    def _evaluation_due(self) -> bool:
        cfg = self.cfg
        return (self.valid_sampler is not None and cfg.eval_interval
                and (self.step % cfg.eval_interval == 0 or self.step == cfg.steps))

    def _log(self, row: dict[str, Any], metrics: IO[str]) -> None:
        """Write every ``log_interval``-th line and every line that reports an event; hand each to ``on_step``."""
        if (self.step % self.cfg.log_interval == 0 or "valid_loss" in row or "redraw" in row or "refresh" in row
                or self.step == self.cfg.steps):
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
        if self.on_step is not None:
            self.on_step(row)

    def _checkpoint_due(self) -> bool:
        return self.step % self.cfg.checkpoint_interval == 0 or self.step == self.cfg.steps

    def checkpoint(self) -> None:
        """Save a checkpoint at ``self.step``; for a learned retriever, then drop the refreshes nothing reads."""
        if self.pending is not None and self.world.main:  # a checkpoint names the pending refresh's folder
            self.pending.result()
        state = {"generator": self.generator.get_state(), "rng": rng_state()}
        if parallel.is_sharded(self.model):  # FSDP: every rank writes its shards (torch.distributed.checkpoint)
            parallel.save_distributed(self.run_dir, self.step, self.model, self.optimizer, self.record, state,
                                      self.world, keep=self.cfg.keep_checkpoints)
        else:
            with parallel.whole_experts(self.model, self.optimizer, self.world):  # sharded experts: gathered to save
                if self.world.main:
                    save_checkpoint(self.run_dir, self.step, self.model, self.record, self.optimizer, state,
                                    keep=self.cfg.keep_checkpoints)
        parallel.barrier()
        if self.learned and self.world.main:  # refreshes no kept checkpoint (nor the run) reads any more give their arrays back
            records = [json.loads((c / "config.json").read_text()) for c in list_checkpoints(self.run_dir)]
            records.append(self.record)
            prune_refreshes(self.run_dir, {r[key]["folder"] for r in records for key in ("refresh", "refresh_pending")
                                           if (r.get(key) or {}).get("folder")})

    # --- refreshes of a learned retriever ----------------------------------------------------------------------

    def refresh_before_step(self) -> dict[str, Any]:
        """Swap in the pending refresh due before this step, then start the refresh scheduled here: in the
        background when there is a lag, else in line. Returns the metrics of what was swapped in ({} if none)."""
        refreshed = {}
        if self.pending is not None and self.step == self.pending.swap_step:
            refreshed = self._swap_in_pending()
        if self._refresh_starts(self.step):
            if self.lag and self.step > 0:  # in the background, swapped in before step + lag
                self._start_background_refresh()
            else:  # synchronous (and the step-0 refresh of a retriever from scratch: no neighbours before it)
                refreshed = self._refresh_in_line()
            self._t_last = time.perf_counter()
        return refreshed

    def _refresh_starts(self, step: int) -> bool:
        """Whether a refresh starts before ``step``: one the schedule holds, or the step-0 one of a retriever from
        scratch; with a lag, only if it would be swapped in before the run ends."""
        if not self.learned:
            return False
        due = (step == 0 and self.rcfg.retriever.init == "scratch") or (step > 0 and refresh_due(step, self.schedule))
        return due and (self.lag == 0 or step == 0 or step + self.lag < self.cfg.steps)

    def _refresh_kwargs(self) -> dict[str, Any]:
        rcfg = self.rcfg
        return {"index": rcfg.refresh.index, "recall_floor": rcfg.refresh.recall_floor, "seed": self.cfg.seed,
                "hops": rcfg.search.hops, "ef_search": rcfg.refresh.ef_search, "frozen": self.frozen,
                "mode": rcfg.refresh.mode}

    def _refresh_in_line(self) -> dict[str, Any]:
        t_refresh, t_cpu = time.perf_counter(), time.process_time()
        refresh_id = self.record["refresh"]["id"] + 1
        new = None
        if self.world.main:  # under several ranks rank 0 refreshes once; the others read its folder
            new = refresh_neighbours(self.model, self.neighbours, self.run_dir, refresh_id, self.step,
                                     **self._refresh_kwargs())
        if self.world.size > 1:
            parallel.barrier()
            if not self.world.main:
                new = load_refresh(self.run_dir / self._folder_name(refresh_id), self.datastore,
                                   self.neighbours.layout, self.rcfg.search.hops)
        refreshed = self.swap_in(new, refresh_id, self.step)
        refreshed["refresh_seconds"] = time.perf_counter() - t_refresh
        refreshed["refresh_cpu_seconds"] = time.process_time() - t_cpu
        return refreshed

    def _start_background_refresh(self) -> None:
        refresh_id, step, swap_step = self.record["refresh"]["id"] + 1, self.step, self.step + self.lag
        if self.world.main:
            self.pending = BackgroundRefresh(self.model, self.rcfg, self.neighbours, self.run_dir, refresh_id, step,
                                             swap_step, **self._refresh_kwargs())
        else:  # rank 0 computes it; this rank reads its folder when it is swapped in
            self.pending = FinishedRefresh(self.run_dir / self._folder_name(refresh_id), self.datastore,
                                           self.neighbours.layout, self.rcfg.search.hops, refresh_id, step, swap_step)
        self.record["refresh_pending"] = {"id": refresh_id, "step": step, "swap_step": swap_step,
                                          "folder": self._folder_name(refresh_id)}

    def _swap_in_pending(self) -> dict[str, Any]:
        t_wait = time.perf_counter()
        if self.world.size > 1:  # rank 0's refresh is written before any rank reads it
            if self.world.main:
                self.pending.result()
            parallel.barrier()
        new = self.pending.result()  # waits only if the background refresh is not done yet
        refreshed = self.swap_in(new, self.pending.refresh_id, self.pending.step)
        refreshed["refresh_seconds"] = time.perf_counter() - t_wait
        refreshed["refresh_cpu_seconds"] = self.pending.cpu_seconds
        self.pending = None
        self._t_last = time.perf_counter()  # the pause is reported as refresh_seconds, not as throughput
        return refreshed

    def swap_in(self, new, refresh_id: int, started: int) -> dict[str, Any]:
        """Serve ``new`` (refresh ``refresh_id``, computed from the weights before step ``started``) from now on
        and record it in the run record; returns its metrics."""
        info = {"refresh": refresh_id, "refresh_changed": changed_share(self.neighbours, new),
                "refresh_recall": new.info["recall_at_10"], "refresh_started": started}
        self._use_neighbours(new)  # swapped between two steps: no batch ever mixes two refreshes
        self.record["refresh"] = {"id": refresh_id, "step": started, "folder": self._folder_name(refresh_id)}
        self.record.pop("refresh_pending", None)
        self._write_record()
        return info

    def _use_neighbours(self, new) -> None:
        self.neighbours = new
        self.train_sampler.neighbours = new
        if self.valid_sampler is not None:
            self.valid_sampler.neighbours = new

    def _folder_name(self, refresh_id: int) -> str:
        """Refresh ``refresh_id``'s folder as the run record names it: relative to the run."""
        return str(refresh_folder(self.run_dir, refresh_id).relative_to(self.run_dir.resolve()))


def train(run_dir: str | Path, datastore: Datastore, config: Config, resume: bool = False,
          on_step: Callable[[dict[str, Any]], None] | None = None, device: str | None = None,
          init_from: str | Path | None = None) -> TrainResult:
    """Train (or resume) the run in ``run_dir``; ``on_step`` receives each step's metrics for a progress bar.
    ``init_from``: a run whose decoder weights a new run starts from (see init.py)."""
    main = parallel.launched().main  # under several ranks, rank 0 alone writes TensorBoard files and curves
    board = TensorBoard.open(run_dir, config.train.tensorboard and main)  # None unless train.tensorboard
    trainer = Trainer(run_dir, datastore, config, board.hook(on_step) if board else on_step, device)
    if init_from is not None and not resume:
        if parallel.is_sharded(trainer.model):
            raise ValueError("--init-from loads a whole decoder: start the run with train.parallel=ddp (or one "
                             "process), then resume it under fsdp")
        load_decoder(trainer.model, init_from)
        trainer.record["init_from"] = str(Path(init_from).resolve())
    trainer.start(resume)
    try:
        result = trainer.run()
    finally:
        if board:
            board.close()
    if main:
        write_curves(run_dir)  # RUN/curves.png (a failure to draw is logged, never raised)
    return result
