"""Long Range Arena ListOps, generated offline, and an encoder classifier built from the decoder's blocks.

ListOps (Nangia & Bowman 2018, as Long Range Arena generates it, Tay et al. 2021): a nested expression over the
digits 0-9 with the operators MIN, MAX, MED (the median, rounded down) and SM (sum modulo 10), such as
``[MAX 2 9 [MIN 4 7 ] 0 ]`` = 9. A tree is drawn top-down: below the maximum depth a node is an operator with
probability 0.25 (with 2 to ``max_args`` children) and a digit otherwise; at the maximum depth it is a digit.
Trees are drawn until ``num_train + num_valid + num_test`` distinct ones have ``min_length < tokens < max_length``;
the label (10 classes) is the expression's value. LRA's published size: 96k / 2k / 2k, lengths 500 to 2000,
depth 10, 10 arguments.

The classifier: token embedding, ``model.num_layers`` blocks of bidirectional attention (softmax or Performer,
``model.attention``) over the non-padding tokens, final RMSNorm, mean pooling over the tokens, a linear head.

Shape legend:
    B  batch    T  tokens (<= data.max_length)    D  model width    K  classes (10)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from knnformer.config import ModelConfig, TrainConfig, apply_overrides, merge_config
from knnformer.model.layers import Block, RMSNorm, init_weights, rotary_tables
from knnformer.runtime import autocast, choose_dtype, resolve_device
from knnformer.train.optim import lr_at, make_optimizer, redraw_due, redraw_step

logger = logging.getLogger(__name__)

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
PAD = "<pad>"
VOCAB = (PAD, *OPERATORS, END, *(str(d) for d in range(10)))  # id 0 pads
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
NUM_CLASSES = 10
OPERATOR_P = 0.25  # LRA's VALUE_P: a node below the maximum depth is a digit when random() > 0.25


@dataclass
class ListOpsConfig:
    num_train: int = 96_000
    """Training examples (LRA: 96,000)."""
    num_valid: int = 2_000
    """Validation examples (LRA: 2,000)."""
    num_test: int = 2_000
    """Test examples (LRA: 2,000)."""
    min_length: int = 500
    """Keep trees of more than this many tokens (LRA: 500)."""
    max_length: int = 2000
    """Keep trees of fewer than this many tokens (LRA: 2000); also the classifier's context."""
    max_depth: int = 10
    """Deepest nesting of operators (LRA: 10)."""
    max_args: int = 10
    """Most arguments of one operator (LRA: 10)."""
    seed: int = 0
    """Seeds the generator: the same config gives the same files."""

    def validate(self) -> None:
        if min(self.num_train, self.num_valid, self.num_test) <= 0:
            raise ValueError("data.num_train, data.num_valid and data.num_test must be positive")
        if not 0 <= self.min_length < self.max_length - 1 or self.max_length < 4:
            raise ValueError(f"need 0 <= data.min_length < data.max_length - 1 and max_length >= 4, "
                             f"got {self.min_length}, {self.max_length}")
        if self.max_depth < 1 or self.max_args < 2:
            raise ValueError("data.max_depth must be >= 1 and data.max_args >= 2")


@dataclass
class LRAConfig:
    data: ListOpsConfig = field(default_factory=ListOpsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# LRA ListOps: 6 layers x 512, 8 heads, MLP 2048, batch 32, 5k steps; lr and schedule ours (AdamW, cosine)
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "published": {
        "data": {},
        "model": {"num_layers": 6, "num_heads": 8, "dim": 512, "ffn_hidden": 2048, "dropout": 0.1},
        "train": {"steps": 5000, "batch_size": 32, "lr": 1e-3, "min_lr": 1e-5, "warmup_steps": 1000,
                  "eval_interval": 1000},
    },
    # trains in minutes on one CPU thread: short expressions, a small model
    "small": {
        "data": {"num_train": 20_000, "num_valid": 500, "num_test": 1000, "min_length": 20, "max_length": 200,
                 "max_depth": 4},
        "model": {"num_layers": 2, "num_heads": 4, "dim": 64, "ffn_hidden": 128,
                  "performer": {"num_features": 64}},  # M = 64 for head width 16 (the paper: M ~ Dh log Dh)
        "train": {"steps": 1500, "batch_size": 32, "lr": 3e-3, "min_lr": 1e-4, "warmup_steps": 100,
                  "eval_interval": 500, "weight_decay": 0.01},
    },
}


def lra_config(preset: str, overrides: list[str] = ()) -> LRAConfig:
    """A preset, then ``section.field=value`` overrides (sections data, model, train); validated."""
    if preset not in PRESETS:
        raise ValueError(f"no LRA preset {preset!r}: pick one of {', '.join(PRESETS)}")
    config = merge_config(LRAConfig(), PRESETS[preset])
    for text in overrides:  # one at a time: each is checked against the fields before the next is read
        merge_config(config, apply_overrides({}, [text]))
    config.model.causal = False
    config.model.vocab_size = len(VOCAB)
    config.model.context = config.data.max_length
    config.data.validate()
    config.model.validate()
    config.train.validate()
    return config


# ---------------------------------------------------------------- the data

Tree = int | tuple[str, list["Tree"]]


def generate_tree(rng: random.Random, depth: int, max_depth: int, max_args: int) -> tuple[Tree, int]:
    """A random expression and its length in tokens, drawn as LRA's ListOps generator draws them."""
    r = rng.random() if depth < max_depth else 1.0
    if r > OPERATOR_P:
        return rng.randrange(10), 1
    args, length = [], 2  # the operator and its closing bracket
    for _ in range(rng.randint(2, max_args)):
        arg, arg_length = generate_tree(rng, depth + 1, max_depth, max_args)
        args.append(arg)
        length += arg_length
    return (rng.choice(OPERATORS), args), length


def evaluate(tree: Tree) -> int:
    if isinstance(tree, int):
        return tree
    op, args = tree
    values = [evaluate(a) for a in args]
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":
        return int(statistics.median(values))
    return sum(values) % 10


def to_text(tree: Tree) -> str:
    if isinstance(tree, int):
        return str(tree)
    op, args = tree
    return " ".join([op, *(to_text(a) for a in args), END])


def parse(text: str) -> Tree:
    """The tree of an expression such as ``[MAX 2 9 [MIN 4 7 ] 0 ]``."""
    stack: list[tuple[str, list]] = [("", [])]
    for token in text.split():
        if token in OPERATORS:
            stack.append((token, []))
        elif token == END:
            if len(stack) < 2:
                raise ValueError(f"unbalanced ']' in {text!r}")
            node = stack.pop()
            stack[-1][1].append(node)
        elif token.isdigit() and len(token) == 1:
            stack[-1][1].append(int(token))
        else:
            raise ValueError(f"unknown ListOps token {token!r} in {text!r}")
    if len(stack) != 1 or len(stack[0][1]) != 1:
        raise ValueError(f"{text!r} is not one complete expression")
    return stack[0][1][0]


def generate_listops(cfg: ListOpsConfig) -> dict[str, list[tuple[str, int]]]:
    """Distinct (expression, value) pairs for train, valid and test, deterministic in ``cfg``."""
    rng = random.Random(cfg.seed)
    total = cfg.num_train + cfg.num_valid + cfg.num_test
    seen: dict[str, int] = {}
    while len(seen) < total:
        tree, length = generate_tree(rng, 1, cfg.max_depth, cfg.max_args)
        if cfg.min_length < length < cfg.max_length:
            text = to_text(tree)
            if text not in seen:
                seen[text] = evaluate(tree)
    items = list(seen.items())  # insertion order: deterministic
    a, b = cfg.num_train, cfg.num_train + cfg.num_valid
    return {"train": items[:a], "valid": items[a:b], "test": items[b:]}


def data_key(cfg: ListOpsConfig) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]


def listops_to_folder_(cfg: ListOpsConfig, folder: Path) -> Path:
    """Write ``folder/listops-KEY/{train,valid,test}.tsv`` (Source, Target) and a manifest, or reuse them when a
    manifest of the same config is there. Written to a temporary folder and renamed into place."""
    final = Path(folder) / f"listops-{data_key(cfg)}"
    manifest = final / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text())["config"] == dataclasses.asdict(cfg):
        return final
    t0 = time.perf_counter()
    splits = generate_listops(cfg)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (tmp / f"{name}.tsv").write_text("Source\tTarget\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    (tmp / "manifest.json").write_text(json.dumps(
        {"task": "listops", "config": dataclasses.asdict(cfg), "vocab": list(VOCAB),
         "sizes": {k: len(v) for k, v in splits.items()}, "seconds": time.perf_counter() - t0}, indent=2))
    if final.exists():
        import shutil

        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def read_split(folder: Path, split: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Token ids of each expression and the labels (N,) of ``folder/split.tsv``."""
    lines = (Path(folder) / f"{split}.tsv").read_text().splitlines()[1:]
    ids, labels = [], []
    for line in lines:
        source, target = line.split("\t")
        ids.append(torch.tensor([TOKEN_ID[t] for t in source.split()], dtype=torch.long))
        labels.append(int(target))
    return ids, torch.tensor(labels)


def pad_batch(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids (B, T) padded to the longest with 0 and the mask (B, T) of real tokens."""
    ids = nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=0)
    return ids, ids != 0


# ---------------------------------------------------------------- the classifier

class Classifier(nn.Module):
    def __init__(self, config: ModelConfig, num_classes: int = NUM_CLASSES):
        super().__init__()
        if config.causal:
            raise ValueError("the LRA classifier reads both ways: set model.causal to false")
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, num_classes)
        cos, sin = rotary_tables(config.context, config.dim // config.num_heads, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self, config)
        nn.init.zeros_(self.head.bias)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normed states (B, T, D) of ids (B, T), padding (``mask`` False) unseen by every real token."""
        T = ids.shape[1]
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, self.rope_cos[:T], self.rope_sin[:T], key_mask=mask)
        return self.norm(x)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K): the head on the mean of the real tokens' states."""
        h = self.encode(ids, mask)
        m = mask[..., None].to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1))


@torch.no_grad()
def accuracy(model: Classifier, seqs: list[torch.Tensor], labels: torch.Tensor, batch_size: int,
             cfg: TrainConfig) -> float:
    was_training = model.training
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together: little padding
    correct = 0
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        ids, mask = pad_batch([seqs[i] for i in idx])
        device = next(model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        with autocast(cfg.dtype, ids.device):
            logits = model(ids, mask)
        correct += int((logits.argmax(-1).cpu() == labels[idx]).sum())
    model.train(was_training)
    return correct / len(seqs)


def train_listops(config: LRAConfig, out: Path, on_step: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Generate (or reuse) the data under ``out/data``, train the classifier and return its accuracies and speed;
    the result is also written to ``out/result-ATTENTION.json`` and each logged step to ``metrics-*.jsonl``."""
    cfg, mcfg = config.train, config.model
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(out)
    t0 = time.perf_counter()
    folder = listops_to_folder_(config.data, out / "data")
    data_seconds = time.perf_counter() - t0
    train_x, train_y = read_split(folder, "train")
    valid_x, valid_y = read_split(folder, "valid")
    test_x, test_y = read_split(folder, "test")
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model = Classifier(mcfg).to(device)
    optimizer = make_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    metrics_path = out / f"metrics-{mcfg.attention}.jsonl"
    history, tokens, train_seconds = [], 0, 0.0
    model.train()
    with open(metrics_path, "w") as metrics:
        for step in range(cfg.steps):
            t_step = time.perf_counter()
            redrew = redraw_due(step, mcfg)
            if redrew:
                redraw_step(model, step, cfg.seed)
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = torch.randint(len(train_x), (cfg.batch_size,), generator=generator).tolist()
            ids, mask = pad_batch([train_x[i] for i in idx])
            ids, mask = ids.to(device), mask.to(device)
            with autocast(cfg.dtype, ids.device):
                logits = model(ids, mask)
            loss = F.cross_entropy(logits.float(), train_y[idx].to(device))
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_seconds += time.perf_counter() - t_step
            tokens += int(mask.sum())
            row = {"step": step + 1, "loss": loss.item(), "lr": lr}
            if redrew:
                row["redraw"] = True
            if cfg.eval_interval and ((step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.steps):
                row["valid_accuracy"] = accuracy(model, valid_x, valid_y, 4 * cfg.batch_size, cfg)
                history.append(row)
            if (step + 1) % cfg.log_interval == 0 or "valid_accuracy" in row or redrew:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            if on_step is not None:
                on_step(row)
    t_eval = time.perf_counter()
    result = {
        "task": "listops", "attention": mcfg.attention, "data": str(folder),
        "valid_accuracy": accuracy(model, valid_x, valid_y, 4 * cfg.batch_size, cfg),
        "test_accuracy": accuracy(model, test_x, test_y, 4 * cfg.batch_size, cfg),
        "majority_class_test_accuracy": float(torch.bincount(test_y, minlength=10).max()) / len(test_y),
        "train_seconds": train_seconds, "ms_per_step": 1000 * train_seconds / cfg.steps,
        "train_tokens_per_s": tokens / train_seconds, "eval_seconds": time.perf_counter() - t_eval,
        "data_seconds": data_seconds, "num_params": sum(p.numel() for p in model.parameters()),
        "history": history, "config": dataclasses.asdict(config), "threads": torch.get_num_threads(),
        "device": str(device), "dtype": choose_dtype(cfg.dtype, device)[0],
    }
    path = out / f"result-{mcfg.attention}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    return result
