"""``import_hf``: a Llama-shaped Hugging Face checkpoint on disk as a knnformer run (the reverse of ``hf.py``).

The folder must hold ``config.json`` (``model_type: llama`` or a ``LlamaForCausalLM`` architecture) and its weights
as safetensors (``model.safetensors``, or shards named by ``model.safetensors.index.json``). What knnformer's
decoder cannot compute is refused with the reason: biases, another activation than SiLU, rotary scaling, a head
width other than hidden / heads, or an output head that differs from the embedding (knnformer ties them).
Grouped-query attention is imported exactly: each key/value head is repeated for the query heads that share it.

The run gets ``checkpoints/step-0000000`` (weights, a fresh optimizer state and a run record with the model config
and default train and retrieval sections), ``config.json`` and, when the folder's tokenizer is byte-level (the
bytes tokenizer or a byte-level BPE), ``tokenizer.json`` in knnformer's form. ``knnformer train DATASTORE --out
RUN --resume`` trains it on from step 0 on a datastore whose tokenizer is the same (the run record names no
datastore until then), ``knnformer train DATASTORE --out NEW --init-from RUN`` starts a new run (with retrieval,
say) from its decoder, and ``evaluate`` and ``generate`` take ``--datastore``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from knnformer.config import Config, Derived, ModelConfig, TrainConfig
from knnformer.export.tokenizer import read_hf_tokenizer
from knnformer.io import writing_folder
from knnformer.model.transformer import Transformer
from knnformer.run.checkpoint import rng_state, save_checkpoint
from knnformer.train.optim import make_optimizer

REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's ``config.json``, refused (naming what is missing or different) unless Llama-shaped."""
    path = folder / "config.json"
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    if not path.is_file():
        raise ValueError(f"{folder} is not a Hugging Face model folder: config.json is missing")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    arch = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
        raise ValueError(f"{folder} is not Llama-shaped: model_type is {cfg.get('model_type')!r} and architectures "
                         f"{arch} (need model_type llama or LlamaForCausalLM)")
    missing = [key for key in REQUIRED if key not in cfg]
    if missing:
        raise ValueError(f"{path} is not Llama-shaped: it lacks {', '.join(missing)}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{folder}: hidden_act {cfg['hidden_act']!r} is not supported (knnformer's SwiGLU uses silu)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ValueError(f"{folder}: {key} is true; knnformer's layers have no biases")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"{folder}: rotary scaling {kind!r} is not supported (only plain rotary positions)")
    heads, dim = cfg["num_attention_heads"], cfg["hidden_size"]
    if cfg.get("head_dim") not in (None, dim // heads) or dim % heads:
        raise ValueError(f"{folder}: head_dim {cfg.get('head_dim')} is not hidden_size / num_attention_heads "
                         f"({dim} / {heads}), which knnformer needs")
    if heads % cfg.get("num_key_value_heads", heads):
        raise ValueError(f"{folder}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                         f"{cfg['num_key_value_heads']}")
    return cfg


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors file or shards."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ValueError(f"{folder}: shards {', '.join(missing)} named by {index.name} are missing")
        weights = {}
        for shard in shards:
            weights.update(load_file(folder / shard))
        return weights
    raise ValueError(f"{folder} has no safetensors weights (model.safetensors or model.safetensors.index.json); "
                     f"convert a pytorch_model.bin with transformers' save_pretrained first")


def model_config(cfg: dict[str, Any], context: int | None) -> ModelConfig:
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    longest = int(cfg.get("max_position_embeddings") or 2048)
    if context is not None and context <= 0:
        raise ValueError(f"--context must be positive, got {context}")
    return ModelConfig(vocab_size=cfg["vocab_size"], context=min(context or longest, longest),
                       num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                       dim=cfg["hidden_size"], ffn_hidden=cfg["intermediate_size"], rope_theta=float(theta),
                       norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                       init_std=float(cfg.get("initializer_range", 0.02)))


def knnformer_weights(weights: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Llama's tensors under knnformer's names; key/value heads repeated for grouped-query attention."""
    L, H = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    Hkv = cfg.get("num_key_value_heads", H)
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(L):
        p = f"model.layers.{i}."
        names += [p + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                  "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                  "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                  "mlp.down_proj.weight")]
    missing = [n for n in names if n not in weights]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"the weights are not Llama-shaped: they lack {', '.join(missing[:3])}{more}")
    biases = sorted(n for n in weights if n.endswith(".bias"))
    if biases:
        raise ValueError(f"the weights hold biases ({biases[0]}, ...); knnformer's layers have none")
    embed = weights["model.embed_tokens.weight"]
    head = weights.get("lm_head.weight")
    if head is None and cfg.get("tie_word_embeddings") is False:
        raise ValueError("the weights are not Llama-shaped: tie_word_embeddings is false but lm_head.weight is missing")
    if head is not None and not torch.equal(head, embed):
        raise ValueError("the output head (lm_head.weight) differs from the embedding; knnformer ties them, so this "
                         "model cannot be imported exactly")

    def repeat_kv(w: torch.Tensor) -> torch.Tensor:  # (Hkv * Dh, D) -> (H * Dh, D), head h reads kv head h // rep
        Dh = w.shape[0] // Hkv
        return w.view(Hkv, Dh, -1).repeat_interleave(H // Hkv, dim=0).reshape(H * Dh, -1)

    out = {"embed.weight": embed, "norm.weight": weights["model.norm.weight"]}
    for i in range(L):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        out[q + "attn_norm.weight"] = weights[p + "input_layernorm.weight"]
        out[q + "ffn_norm.weight"] = weights[p + "post_attention_layernorm.weight"]
        out[q + "attn.qkv.weight"] = torch.cat([weights[p + "self_attn.q_proj.weight"],
                                                repeat_kv(weights[p + "self_attn.k_proj.weight"]),
                                                repeat_kv(weights[p + "self_attn.v_proj.weight"])])
        out[q + "attn.proj.weight"] = weights[p + "self_attn.o_proj.weight"]
        out[q + "ffn.gate_up.weight"] = torch.cat([weights[p + "mlp.gate_proj.weight"],
                                                   weights[p + "mlp.up_proj.weight"]])
        out[q + "ffn.down.weight"] = weights[p + "mlp.down_proj.weight"]
    return {k: v.float().contiguous() for k, v in out.items()}


def import_hf(folder: str | Path, out: str | Path, force: bool = False, context: int | None = None) -> dict:
    """Write the Llama-shaped checkpoint in ``folder`` as the knnformer run ``out``; returns a summary.
    ``context``: the run's context (default the model's ``max_position_embeddings``)."""
    folder, out = Path(folder), Path(out)
    if out.exists() and not force:
        raise ValueError(f"{out} already exists; pass --force to replace it")
    cfg = read_config(folder)
    mcfg = model_config(cfg, context)
    weights = knnformer_weights(read_weights(folder), cfg)
    model = Transformer(mcfg)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        detail = str(e).splitlines()[-1].strip()
        raise ValueError(f"{folder}: the weights do not fit its config.json ({detail})") from None
    tokenizer = read_hf_tokenizer(folder)
    # fp32 as transformers computes it (train.dtype's default, auto, would take bf16 on bf16 hardware)
    config = Config(model=mcfg, train=TrainConfig(dtype="float32"))
    record = {"config": config.to_dict(), "derived": dataclasses.asdict(Derived()),
              "datastore": {"path": None, "corpus_sha256": None,
                            "tokenizer_fingerprint": tokenizer.fingerprint() if tokenizer is not None else None},
              "imported_from": {"folder": str(folder.resolve()), "architecture": "LlamaForCausalLM",
                                "num_key_value_heads": cfg.get("num_key_value_heads", cfg["num_attention_heads"])}}
    # a fresh optimizer and generators, as a new run has them at step 0: `knnformer train DATASTORE --out RUN
    # --resume` then trains the imported model on a datastore with the same tokenizer
    state = {"generator": torch.Generator().manual_seed(config.train.seed + 1).get_state(), "rng": rng_state()}
    with writing_folder(out) as tmp:
        save_checkpoint(tmp, 0, model, record, make_optimizer(model, config.train), state)
        (tmp / "config.json").write_text(json.dumps(record, indent=2))
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
    return {"out": str(out), "parameters": model.num_params(), "context": mcfg.context,
            "tokenizer": tokenizer.kind if tokenizer is not None else None,
            "heads": mcfg.num_heads, "key_value_heads": record["imported_from"]["num_key_value_heads"]}
