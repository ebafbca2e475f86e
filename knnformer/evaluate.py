"""Scoring a whole split: loss, perplexity and bits per UTF-8 byte, every token after the first scored once.

With ``stride == context`` (the default) the split is cut into consecutive windows of the model's context, the
exhaustive form of nanoGPT's estimate. With a smaller stride, windows overlap and each scores only the tokens
the previous windows did not, so every token is predicted from at least ``context - stride`` tokens of history.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from knnformer.checkpoint import latest_checkpoint, load_checkpoint
from knnformer.config import config_from_dict
from knnformer.datastore import Datastore
from knnformer.model import Transformer
from knnformer.trainer import autocast


def window_plan(num_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows as (begin, first scored target offset, number of targets). Window inputs are
    ``tokens[begin : begin + n]`` and its targets ``tokens[begin + 1 : begin + 1 + n]``; target positions
    ``1 .. num_tokens - 1`` are each scored by exactly one window."""
    if not 0 < stride <= context:
        raise ValueError(f"--stride must be between 1 and the context ({context}), got {stride}")
    plan, scored_upto, begin = [], 1, 0
    while scored_upto < num_tokens:
        n = min(context, num_tokens - 1 - begin)
        plan.append((begin, scored_upto - (begin + 1), n))
        scored_upto = begin + 1 + n
        begin += stride
    return plan


@torch.no_grad()
def score_tokens(model: Transformer, tokens: np.ndarray, token_bytes: np.ndarray, stride: int | None = None,
                 batch_size: int = 32, dtype: str = "float32", progress: Callable[[int], None] | None = None
                 ) -> dict[str, Any]:
    """Total negative log-likelihood of ``tokens[1:]`` given what precedes each, in windows of the context."""
    context = model.config.context
    stride = stride or context
    model.eval()
    device = next(model.parameters()).device
    plan = window_plan(len(tokens), context, stride)
    nll, num_tokens, num_bytes = 0.0, 0, 0
    token_bytes = torch.from_numpy(np.asarray(token_bytes))
    # windows of equal length are batched together; only the last one or few are shorter
    i = 0
    while i < len(plan):
        n = plan[i][2]
        group = [plan[i]]
        while i + len(group) < len(plan) and len(group) < batch_size and plan[i + len(group)][2] == n:
            group.append(plan[i + len(group)])
        rows = np.stack([tokens[b : b + n + 1] for b, _, _ in group]).astype(np.int64)
        x, y = torch.from_numpy(rows[:, :-1]).to(device), torch.from_numpy(rows[:, 1:])
        with autocast(dtype, device):
            logits, _ = model(x)
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="none")
        losses = losses.view(len(group), n).cpu().double()
        for row, (_, first, _) in enumerate(group):
            nll += float(losses[row, first:].sum())
            num_tokens += n - first
            num_bytes += int(token_bytes[y[row, first:]].sum())
        if progress is not None:
            progress(sum(g[2] - g[1] for g in group))
        i += len(group)
    return {"nll": nll, "tokens": num_tokens, "bytes": num_bytes}


def summarize(total: dict[str, Any], split: str, stride: int, context: int) -> dict[str, Any]:
    loss = total["nll"] / max(1, total["tokens"])
    return {
        "split": split,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": total["nll"] / math.log(2) / max(1, total["bytes"]),
        "tokens": total["tokens"],
        "bytes": total["bytes"],
        "stride": stride,
        "context": context,
        "windows": "consecutive" if stride == context else "sliding",
    }


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[Transformer, dict[str, Any], Path]:
    """The model of a run's newest checkpoint, its run record and the checkpoint path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} does not exist")
    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    record = ckpt["config"]
    config = config_from_dict(record["config"])
    model = Transformer(config.model)
    try:
        model.load_state_dict(ckpt["weights"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {ckpt['path']} does not fit its own config ({str(e)[:200]})") from None
    return model.to(device).eval(), record, ckpt["path"]


def open_run_datastore(record: dict[str, Any], override: str | None = None) -> Datastore:
    """The datastore a run was trained on (or ``override``), refused if its tokenizer differs from the run's."""
    path = override or record["datastore"]["path"]
    datastore = Datastore.open(path)
    expected = record["datastore"]["tokenizer_fingerprint"]
    if datastore.manifest["tokenizer"]["fingerprint"] != expected:
        raise ValueError(f"datastore {path} was built with another tokenizer than this run's; "
                         f"evaluate on the datastore the run was trained on, or retrain")
    return datastore


def evaluate_run(run_dir: str | Path, split: str = "valid", stride: int | None = None, datastore: str | None = None,
                 batch_size: int = 32, progress_factory=None) -> dict[str, Any]:
    model, record, ckpt_path = load_run(run_dir)
    store = open_run_datastore(record, datastore)
    context = model.config.context
    tokens = store.require_split(split, 2)
    stride = stride or context
    progress = progress_factory(len(tokens) - 1) if progress_factory else None
    dtype = record["config"]["train"]["dtype"]
    total = score_tokens(model, tokens, store.tokenizer.token_bytes, stride, batch_size, dtype, progress)
    result = summarize(total, split, stride, context)
    result["checkpoint"] = str(ckpt_path)
    result["step"] = int(Path(ckpt_path).name.split("-")[1])
    return result


def format_table(result: dict[str, Any]) -> str:
    rows = [("split", result["split"]), ("checkpoint step", result.get("step", "")),
            ("windows", f"{result['windows']} (context {result['context']}, stride {result['stride']})"),
            ("tokens scored", f"{result['tokens']:,}"), ("bytes", f"{result['bytes']:,}"),
            ("loss (nats/token)", f"{result['loss']:.4f}"), ("perplexity", f"{result['perplexity']:.3f}"),
            ("bits per byte", f"{result['bits_per_byte']:.4f}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2)
