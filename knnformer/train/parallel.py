"""Many processes on PyTorch's own distributed engine: the only module of knnformer that imports
torch.distributed (tests/test_layers.py holds it to that); the model stays a plain ``nn.Module``.

A run under ``torchrun`` (or ``knnformer train --nproc N``, which starts torchrun) has one process per rank.
``start`` joins the process group (gloo on CPU, NCCL on CUDA) and picks each rank's device; ``wrap`` applies
activation checkpointing per block and then DDP or FSDP2 (``fully_shard`` per block, then the root) as
``train.parallel`` says; ``accumulating`` turns the gradient all-reduce off for every micro-batch but the last
(DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``). The batch: every rank draws the same *global*
micro-batch of ``train.batch_size`` windows from the run's seeded generator and keeps its own slice
(``shard_batch``), so the ranks read different windows, the global batch is what the config says, and a run at
N ranks takes the same steps as one at 1 rank (up to float summation order): the loss curve, and a resume at
another world size, stay the single-process ones.

Checkpoints of an FSDP run go through torch.distributed.checkpoint (``save_distributed``): each rank writes its
shards of the weights and the optimizer state to ``step-N/dcp/``, rank 0 writes the full weights
(``model.safetensors``, which ``evaluate`` and ``generate`` read), the run record and the step's state; the
folder appears atomically once every rank has written. ``load_distributed`` reads it back at any world size
(DCP reshards), with or without a process group. DDP runs use the single-process checkpoint, written by rank 0.

Expert parallelism (``model.moe.expert_parallel``): ``shard_experts`` keeps each rank's share of every MoE
layer's experts and gives the layer an ``ExpertExchange`` that sends each kept token to the rank holding its
expert with ``all_to_all_single`` and brings the outputs back (differentiable), so the layer's output and
gradients are those of the whole layer on the rank's tokens. In the trainer (``wrap`` under DDP) each rank's
experts are left out of DDP's all-reduce, their gradients divided by the ranks (a rank's backward already sums
every rank's tokens), ``clip_grad_norm`` counts every rank's experts once, and checkpoints are saved and loaded
inside ``whole_experts`` (all experts and their optimizer state gathered), so they are one-process checkpoints
that resume at any world size.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from knnformer.runtime import resolve_device

logger = logging.getLogger(__name__)

TIMEOUT_S = int(os.environ.get("KNNFORMER_DIST_TIMEOUT", "300"))
"""How long a collective waits for a rank that stopped answering before every rank fails with an error."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks torchrun started (rank 0 of 1 when run alone)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> World:
    """The world torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)."""
    env = os.environ
    size = int(env.get("WORLD_SIZE", "1"))
    return World(int(env.get("RANK", "0")), size, int(env.get("LOCAL_RANK", "0")),
                 int(env.get("LOCAL_WORLD_SIZE", str(size))))


def start(device_name: str = "auto") -> tuple[World, torch.device]:
    """Join the process group when torchrun started several ranks, and the device this rank computes on
    (``cuda:LOCAL_RANK`` for CUDA)."""
    world = launched()
    device = resolve_device(device_name)
    if world.size == 1:
        return world, device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ValueError(f"rank {world.rank} wants cuda:{world.local_rank} but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s); lower --nproc-per-node")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    elif device.type == "mps":
        raise ValueError("several ranks on one MPS device are not supported; use --device cpu or one rank")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
        except (RuntimeError, ValueError, OSError) as e:  # a failed rendezvous: one line, not a stack of them
            raise ValueError(f"rank {world.rank}: joining the process group ({backend}, MASTER_ADDR="
                             f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}) failed: {e}") from None
    return world, device


def stop() -> None:
    """Leave the process group; every rank waits for the others first (gloo aborted a rank whose peer left
    while it was still tearing down)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (the values themselves when alone)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_batch(batch, world: World):
    """Rank ``world.rank``'s contiguous slice of a global micro-batch (a ``run.batches.Batch``)."""
    if world.size == 1:
        return batch
    B = batch.x.shape[0]
    if B % world.size:
        raise ValueError(f"train.batch_size ({B}) must be divisible by the {world.size} ranks")
    lo, hi = world.rank * B // world.size, (world.rank + 1) * B // world.size
    def cut(t):
        return None if t is None else t[lo:hi]

    vectors = None if batch.retrieval_vectors is None else tuple(v[lo:hi] for v in batch.retrieval_vectors)
    return type(batch)(batch.x[lo:hi], batch.y[lo:hi], cut(batch.neighbours), cut(batch.neighbour_mask),
                       cut(batch.neighbour_ids), vectors)


# --- wrapping the model --------------------------------------------------------------------------------------


def _checkpointed(forward, *args, **kwargs):
    if torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing per decoder block: each block's forward keeps only its input and recomputes the
    rest in the backward pass (same parameter names, so checkpoints are unchanged)."""
    for block in model.blocks:
        block.forward = functools.partial(_checkpointed, block.forward)


def resolved_parallel(cfg, world: World) -> str:
    """``train.parallel`` for this world: ``none`` alone, and ``ddp`` for ``none`` with several ranks."""
    if world.size == 1:
        return "none"
    return "ddp" if cfg.parallel == "none" else cfg.parallel


def wrap(model: torch.nn.Module, cfg, world: World, device: torch.device) -> torch.nn.Module:
    """What the training step calls: the model with activation checkpointing (if asked) under DDP or FSDP2. For
    FSDP the model itself becomes sharded (build its optimizer after this call)."""
    if cfg.activation_checkpointing:
        checkpoint_blocks(model)
    kind = resolved_parallel(cfg, world)
    if kind == "fsdp" and world.size > 1 and any(getattr(getattr(m, "cfg", None), "expert_parallel", False)
                                                 for m in model.modules() if hasattr(m, "experts_gate_up")):
        raise ValueError("model.moe.expert_parallel shards the experts itself: train it with train.parallel=ddp "
                         "(or none), not fsdp")
    if kind == "ddp" and shard_experts(model, world):  # each rank's experts are its own: DDP leaves them alone
        from torch.nn.parallel import DistributedDataParallel

        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, [name for name, p in model.named_parameters() if any(p is q for q in expert_params(model))])
        for p in expert_params(model):  # the rank's backward sums every rank's tokens' gradients: / ranks = mean
            p.register_hook(functools.partial(torch.div, other=world.size))
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=any(getattr(b, "ffn", None) is not None
                                                                  and hasattr(b.ffn, "router") for b in model.blocks))
    if kind == "fsdp":
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        kwargs: dict[str, Any] = {}
        if cfg.fsdp_mixed_precision:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        offload = cfg.fsdp_cpu_offload and device.type != "cpu"  # on a CPU everything already lives there
        if cfg.fsdp_cpu_offload and not offload:
            logger.info("train.fsdp_cpu_offload changes nothing on the CPU (torch's policy needs an accelerator)")
        kwargs["offload_policy"] = CPUOffloadPolicy() if offload else OffloadPolicy()
        for block in model.blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
    return model


def accumulating(step_model: torch.nn.Module, last: bool):
    """The context of one micro-batch's forward and backward: gradients are all-reduced only on the ``last``
    micro-batch of a step (DDP's ``no_sync``; FSDP2's ``set_requires_gradient_sync``)."""
    if hasattr(step_model, "no_sync"):
        return nullcontext() if last else step_model.no_sync()
    if hasattr(step_model, "set_requires_gradient_sync"):
        step_model.set_requires_gradient_sync(last)
    return nullcontext()


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds FSDP2-sharded parameters (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


# --- checkpoints through torch.distributed.checkpoint -----------------------------------------------------------

DCP_FOLDER = "dcp"


def is_distributed_checkpoint(path: Path) -> bool:
    return (Path(path) / DCP_FOLDER).is_dir()


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every rank takes part; rank 0 gets the full (unsharded) weights on the CPU, the others {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_distributed(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     record: dict[str, Any], state: dict[str, Any], world: World, keep: int = 2) -> Path:
    """Checkpoint ``step-N`` of a sharded run: every rank its shards (DCP), rank 0 the full weights, the record
    and the state. Rank 0 fills a temporary folder and renames it into place only after every rank has written, so
    a rank that dies leaves no half-written checkpoint (the others fail at the barrier)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from knnformer.io import file_sha256, writing_folder
    from knnformer.run.checkpoint import prune_checkpoints, save_state

    final = Path(run_dir) / "checkpoints" / f"step-{step:07d}"
    model_sd, optim_sd = get_state_dict(model, optimizer)
    weights = full_weights(model)
    context = writing_folder(final) if world.main else nullcontext(None)
    with context as tmp:
        tmp = Path(broadcast(str(tmp) if tmp is not None else None))
        barrier()
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / DCP_FOLDER)
        barrier()
        if world.main:
            save_file({k: v.detach().contiguous() for k, v in weights.items()}, tmp / "model.safetensors")
            (tmp / "config.json").write_text(json.dumps(record, indent=2))
            save_state(tmp, {"step": step, "world_size": world.size, **state})  # as save_checkpoint writes it
            names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            (tmp / "checksums.json").write_text(json.dumps({n: file_sha256(tmp / n) for n in names}, indent=2))
    barrier()
    if world.main:
        prune_checkpoints(run_dir, keep)
    barrier()
    return final


def load_distributed(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a DCP checkpoint's weights and optimizer state into ``model`` (plain, DDP's or FSDP-sharded) and
    ``optimizer``, at whatever world size it was saved with."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():  # alone, DCP warns that it loads in a single process: that is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=Path(path) / DCP_FOLDER)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


# --- starting torchrun ---------------------------------------------------------------------------------------


def available_slots(device_name: str) -> tuple[int, str]:
    """How many ranks this machine can hold for ``device_name``: its GPUs, or the CPUs this process may use."""
    device = resolve_device(device_name)
    if device.type == "cuda":
        return torch.cuda.device_count(), "CUDA devices"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cpus, "CPU cores"


def launch(nproc: int, argv: list[str], device_name: str = "auto") -> int:
    """``knnformer ... --nproc N``: run the same command (``argv``, without ``--nproc``) under torchrun with N
    ranks on this machine and return its exit status. Refuses more ranks than cores or GPUs."""
    slots, what = available_slots(device_name)
    if nproc > slots:
        raise ValueError(f"--nproc {nproc} is more than the {slots} {what} here")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "knnformer", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, slots // nproc)))
    logger.info("starting %s", " ".join(cmd))
    return subprocess.call(cmd, env=env)


# --- expert parallelism --------------------------------------------------------------------------------------


def _all_to_all(output: torch.Tensor, input: torch.Tensor, output_splits: list[int],
                input_splits: list[int]) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` (its backward is the reverse exchange)."""
    from torch.distributed.nn.functional import all_to_all_single

    with warnings.catch_warnings():  # deprecated for the functional collectives, whose version aborted on gloo here
        warnings.simplefilter("ignore", FutureWarning)
        return all_to_all_single(output, input, output_splits, input_splits)


class ExpertExchange:
    """Runs a MoE layer's experts when each of ``world.size`` ranks holds ``E / size`` of them (rank r: experts
    r * L .. r * L + L - 1). Called by ``MoE`` with the rank's kept rows (R, D) ordered by global expert and each
    expert's row count (E,); sends every row to its expert's rank (``all_to_all_single``), runs the local experts
    as grouped GEMMs, and sends the outputs back in the rows' order. Both exchanges are differentiable, so the
    gradient of a local expert sums the contributions of every rank's tokens."""

    def __init__(self, layer: torch.nn.Module, world: World):
        self.layer, self.size = layer, world.size
        self.local = layer.experts_gate_up.shape[0]

    def __call__(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        W, L = self.size, self.local
        send = counts.to(torch.int64).view(W, L)  # rows for (destination rank, its local expert)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)  # recv[src, l]: rows rank src sends to my expert l
        in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        received = _all_to_all(rows.new_empty(sum(out_splits), rows.shape[1]), rows.contiguous(),
                                     out_splits, in_splits)
        expert = torch.repeat_interleave(torch.arange(L, device=rows.device).repeat(W), recv.flatten())
        order = torch.argsort(expert, stable=True)  # received rows by local expert (then by source rank)
        ends = torch.bincount(expert, minlength=L).cumsum(0)
        out = self.layer.run_experts_grouped(received[order], ends)
        back = out[torch.argsort(order)]  # the received order again
        return _all_to_all(back.new_empty(rows.shape[0], back.shape[1]), back.contiguous(), in_splits,
                                 out_splits)


def shard_experts(model: torch.nn.Module, world: World) -> int:
    """Expert parallelism for the MoE layers whose config asks for it (``model.moe.expert_parallel``): each keeps
    its rank's ``E / size`` experts (the others' weights are dropped) and exchanges tokens through an
    ``ExpertExchange``. Returns the number of layers sharded (0 alone or without MoE)."""
    layers = [m for m in model.modules() if hasattr(m, "experts_gate_up") and getattr(m.cfg, "expert_parallel", False)]
    if world.size == 1 or not layers:
        return 0
    for layer in layers:
        E = layer.experts_gate_up.shape[0]
        if E % world.size:
            raise ValueError(f"model.moe.num_experts ({E}) must be divisible by the {world.size} ranks for "
                             f"expert parallelism")
        if layer.cfg.router == "expert_choice":
            raise ValueError("model.moe.expert_parallel supports the top1 and top2 routers, not expert_choice")
        L = E // world.size
        lo = world.rank * L
        with torch.no_grad():
            layer.experts_gate_up = torch.nn.Parameter(layer.experts_gate_up[lo:lo + L].clone())
            layer.experts_down = torch.nn.Parameter(layer.experts_down[lo:lo + L].clone())
        layer.exchange = ExpertExchange(layer, world)
    return len(layers)


def expert_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The expert weights ``shard_experts`` left on this rank (each rank holds different ones); [] when none."""
    return [p for m in model.modules() if isinstance(getattr(m, "exchange", None), ExpertExchange)
            for p in (m.experts_gate_up, m.experts_down)]


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over the whole model; with sharded experts the norm counts every rank's experts once
    (their squares summed over the ranks), so every rank clips by the one-process factor."""
    experts = expert_params(model)
    if not experts:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    ids = {id(p) for p in experts}
    grads = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in ids]
    local = [p.grad for p in experts if p.grad is not None]
    sq = torch.stack([g.detach().double().pow(2).sum() for g in local]).sum() if local else torch.zeros((), dtype=torch.float64)
    dist.all_reduce(sq)
    sq = sq + (torch.stack([g.detach().double().pow(2).sum() for g in grads]).sum() if grads else 0.0)
    norm = sq.sqrt().float()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads + local:
        g.mul_(coef.to(g.device, g.dtype))
    return norm


class _WholeExperts:
    """See ``whole_experts``."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World):
        self.model, self.optimizer, self.world = model, optimizer, world

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world.size)]
        dist.all_gather(parts, t.detach().contiguous())
        return torch.cat(parts)

    def __enter__(self):
        self.swaps = []
        for layer in [m for m in self.model.modules() if isinstance(getattr(m, "exchange", None), ExpertExchange)]:
            for name in ("experts_gate_up", "experts_down"):
                local = getattr(layer, name)
                whole = torch.nn.Parameter(self._gather(local), requires_grad=local.requires_grad)
                state = self.optimizer.state.pop(local, {})
                self.optimizer.state[whole] = {k: self._gather(v) if torch.is_tensor(v) and v.shape == local.shape
                                               else v for k, v in state.items()}
                self._rebind(local, whole)
                setattr(layer, name, whole)
                layer.exchange = None  # a whole layer runs its own experts (if anything runs it meanwhile)
                self.swaps.append((layer, name, local, whole))
        return self

    def _rebind(self, old: torch.nn.Parameter, new: torch.nn.Parameter) -> None:
        for group in self.optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]

    def __exit__(self, *exc):
        L = None
        for layer, name, local, whole in self.swaps:
            L = local.shape[0]
            lo = self.world.rank * L
            with torch.no_grad():
                local.copy_(whole[lo:lo + L])
            state = self.optimizer.state.pop(whole, {})
            self.optimizer.state[local] = {k: v[lo:lo + L].clone() if torch.is_tensor(v) and v.shape == whole.shape
                                           else v for k, v in state.items()}
            self._rebind(whole, local)
            setattr(layer, name, local)
            layer.exchange = ExpertExchange(layer, self.world)
        return False


def whole_experts(model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World):
    """Every rank takes part: within it the sharded MoE layers hold all their experts (and the optimizer their whole
    state), gathered from the ranks, so a checkpoint saved there is the one-process one and one loaded there any
    world size's; on leaving, each rank keeps its share of what the layers then hold. Nothing without sharded
    experts."""
    if not expert_params(model):
        return nullcontext()
    return _WholeExperts(model, optimizer, world)


# --- sharded embedding for `knnformer index --nproc N` ----------------------------------------------------------


def embed_sharded(store_path: str | Path, embedder, chunk_size: int, world: World, batch_size: int = 1024,
                  progress=None, force: bool = False) -> bool:
    """Embed a datastore's chunks over the ranks: rank r embeds the r-th contiguous share into its own shard file,
    then rank 0 joins the shards into ``embeddings.f16`` and records it in the manifest, exactly as a one-process
    ``chunks_to_embeddings`` would (so the index build that follows reuses it). Every rank calls it; returns
    whether the stored embeddings already matched (nothing embedded)."""
    import numpy as np

    from knnformer.data.chunks import chunk_layout, chunk_texts, read_retrieval_manifest, update_retrieval_manifest
    from knnformer.data.datastore import Datastore
    from knnformer.io import writing_file
    from knnformer.retrieval.embedders import EMBEDDINGS_FILE, embeddings_entry

    store = Datastore.open(store_path)
    layout = chunk_layout(store, chunk_size)
    want = embeddings_entry(store, layout, embedder)
    have = read_retrieval_manifest(store.path).get("embeddings") or {}
    if not force and all(have.get(k) == v for k, v in want.items()) and (store.path / EMBEDDINGS_FILE).is_file():
        return True
    n = layout.num_chunks
    lo, hi = world.rank * n // world.size, (world.rank + 1) * n // world.size
    shard = store.path / f".{EMBEDDINGS_FILE}.shard-{world.rank}-of-{world.size}"
    t0 = time.perf_counter()
    with writing_file(shard) as tmp:
        out = np.memmap(tmp, dtype=np.float16, mode="w+", shape=(max(hi - lo, 1), embedder.dim))
        for b in range(lo, hi, batch_size):
            ids = np.arange(b, min(b + batch_size, hi))
            out[b - lo: b - lo + len(ids)] = embedder.embed(chunk_texts(store, layout, ids)).astype(np.float16)
            if progress is not None:
                progress(len(ids))
        out.flush()
        del out
    barrier()  # every shard is written
    if world.main:
        update_retrieval_manifest(store.path, drop=("embeddings",))
        with writing_file(store.path / EMBEDDINGS_FILE) as tmp:
            out = np.memmap(tmp, dtype=np.float16, mode="w+", shape=(max(n, 1), embedder.dim))
            for r in range(world.size):
                a, z = r * n // world.size, (r + 1) * n // world.size
                part = store.path / f".{EMBEDDINGS_FILE}.shard-{r}-of-{world.size}"
                if z > a:
                    out[a:z] = np.memmap(part, dtype=np.float16, mode="r", shape=(z - a, embedder.dim))
            out.flush()
            del out
        update_retrieval_manifest(store.path, {"embeddings": {**want, "ranks": world.size,
                                                              "seconds": round(time.perf_counter() - t0, 3)}})
    barrier()  # rank 0 has read every shard
    shard.unlink(missing_ok=True)
    return False
