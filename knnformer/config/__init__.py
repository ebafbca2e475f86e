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

from knnformer.config.retrieval import (
    DERIVED_RETRIEVAL_KEYS,
    FLAT_RETRIEVAL_KEYS,
    Derived,
    RefreshConfig,
    RetrievalConfig,
    RetrieverConfig,
    Schedule,
    SearchConfig,
    migrate_retrieval,
    parse_schedule,
    resolved_lag,
)

__all__ = ["Config", "ModelConfig", "TrainConfig", "MoEConfig", "PerformerConfig", "RetrievalConfig",
           "RetrieverConfig", "RefreshConfig", "SearchConfig", "Derived", "Schedule", "FLAT_RETRIEVAL_KEYS",
           "DERIVED_RETRIEVAL_KEYS", "migrate_retrieval", "parse_schedule", "resolved_lag", "retrieval_config",
           "config_from_dict", "load_config", "apply_overrides", "merge_config", "parse_override", "resolve_preset",
           "parse_optimizer"]

logger = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).parent.parent / "configs"


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
    expert_parallel: bool = False
    """Under several ranks: shard each MoE layer's experts over the ranks (E must be divisible by them), tokens
    sent to their expert's rank with ``all_to_all_single`` (see train/parallel.py). The layer's output and
    gradients are those of the whole layer; only ``top1`` / ``top2``. Trains under DDP (not FSDP); checkpoints hold
    every expert, so they resume at any number of ranks."""
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
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``bfloat16`` / ``float16`` run forward and backward under autocast (fp16 with a gradient scaler); weights
    and optimizer stay fp32. ``auto`` picks bf16 where the hardware runs it natively (a CUDA device with bf16, a
    CPU with avx512_bf16 or AMX) and fp32 elsewhere; the run record says what was picked and why."""
    device: str = "auto"
    """Where the run computes: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``
    (``--device``). Under torchrun each rank takes ``cuda:LOCAL_RANK``."""
    parallel: Literal["none", "ddp", "fsdp"] = "none"
    """Under torchrun (or ``--nproc N``): ``ddp`` replicates the model and all-reduces gradients; ``fsdp`` shards
    parameters, gradients and optimizer state per block (FSDP2 ``fully_shard``); ``none`` with several ranks
    means ``ddp``. ``batch_size`` is per rank: the global batch is ``batch_size x grad_accum x ranks``."""
    fsdp_mixed_precision: bool = False
    """FSDP only: parameters gathered and gradients reduced in bf16 (``MixedPrecisionPolicy``), fp32 master."""
    fsdp_cpu_offload: bool = False
    """FSDP only: parameters, gradients and optimizer state live on the CPU between uses (``CPUOffloadPolicy``,
    ZeRO-Offload); on a CPU-only machine it changes nothing."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them (less memory, ~1/3 more
    compute)."""
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
    """Torch intra-op threads; 0 leaves torch's default (one per core; ``torchrun`` sets OMP_NUM_THREADS=1 per
    rank unless told otherwise, ``--nproc N`` sets cores / N). Waiting threads sleep rather than spin
    (``OMP_WAIT_POLICY=PASSIVE``, set by ``import knnformer``), which is what keeps a shared machine fast."""
    optimizer: str = "adamw"
    """``adamw``; ``muon``, ``soap`` or ``shampoo`` for the hidden weight matrices (AdamW for the rest, same ``lr``);
    or ``opt-list:N``, entry N of the learned NAdamW list, which brings its own rate, schedule and decays
    (train/optim.py, train/opt_list.py)."""
    tensorboard: bool = False
    """Also write TensorBoard event files of every step's metrics into ``RUN/tensorboard/`` (needs the
    ``tensorboard`` package)."""

    def validate(self) -> None:
        parse_optimizer(self.optimizer)
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_interval", "keep_checkpoints", "log_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"train.lr must be > 0 and 0 <= train.min_lr <= train.lr (got {self.lr}, {self.min_lr})")
        if self.warmup_steps < 0 or self.eval_interval < 0 or self.decay_steps < 0:
            raise ValueError("train.warmup_steps, train.eval_interval and train.decay_steps must be >= 0")


OPTIMIZERS = ("adamw", "muon", "soap", "shampoo")


def parse_optimizer(name: str) -> tuple[str, int | None]:
    """``train.optimizer`` as (kind, entry): ("adamw", None) ... or ("opt-list", N) for ``opt-list:N``."""
    if name in OPTIMIZERS:
        return name, None
    kind, _, index = name.partition(":")
    if kind == "opt-list" and index.isdigit():
        return kind, int(index)
    raise ValueError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)} or opt-list:N (N = 0, 1, ...); "
                     f"got {name!r}")


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


def retrieval_config(**values: Any) -> RetrievalConfig:
    """A ``RetrievalConfig`` from keyword values, flat (old) keys accepted: ``retrieval_config(enabled=True,
    retriever="learned", refresh="0-:10")``. Not validated against a model (``Config.validate`` does that)."""
    config = RetrievalConfig()
    _merge(config, migrate_retrieval(values), "retrieval.")
    return config


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
