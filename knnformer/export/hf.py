"""``export_run``: a run's decoder as a Hugging Face folder, ``LlamaForCausalLM`` (or ``MixtralForCausalLM``).

knnformer's decoder is Llama's: pre-norm RMSNorm blocks, rotary positions, bias-free SwiGLU, a final RMSNorm and
a head tied to the embedding. What the mapping has to get right (``model/layers.py``):

- rotary: knnformer rotates the pairs (i, i + Dh/2) with ``inv_freq = theta ** (-2i / Dh)``, Llama's
  ``rotate_half`` layout, so q and k are copied without a permutation (an interleaved-pairs model would need
  one);
- attention: ``qkv`` is one (3D, D) matrix whose rows are q, then k, then v, each head-major (H, Dh): its three
  row blocks are ``q_proj``, ``k_proj`` and ``v_proj``; as many key/value heads as query heads;
- SwiGLU: ``gate_up`` is (2F, D), gate rows first: ``gate_proj`` and ``up_proj``; ``down`` is ``down_proj``;
- RMSNorm's eps is ``model.norm_eps`` (``rms_norm_eps``), rotary's base ``model.rope_theta`` (``rope_theta``);
- the head is the embedding (``tie_word_embeddings: true``, no ``lm_head.weight`` written).

A Mixture-of-Experts run exports as Mixtral when Mixtral computes what it computes: top-2 routing over a softmax
with the two gates renormalised, every block an MoE, no token dropped at evaluation (``eval_capacity_factor: 0``).
Its experts' stacked (E, D, 2F) and (E, F, D) weights become Mixtral's per-expert ``w1`` (gate), ``w3`` (up) and
``w2`` (down). Other routers (Switch's top-1 keeps the raw probability, expert choice is not causal) and MoE in
every other block are refused, as is a Performer (FAVOR+ attention is not softmax attention). A retrieval run
exports its decoder: the retrieval layers (neighbour encoder, chunked cross-attention, learned retriever) are
left out, so the exported model is the run with retrieval off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from knnformer import __version__
from knnformer.config import ModelConfig
from knnformer.data.tokenizer import Tokenizer, load_tokenizer
from knnformer.export.tokenizer import write_hf_tokenizer
from knnformer.io import writing_folder
from knnformer.run.record import load_run, run_retrieval


def refusal(config: ModelConfig) -> str | None:
    """Why a model cannot be exported faithfully, or None."""
    if config.attention == "performer":
        return ("a Performer run (model.attention=performer) cannot be exported: FAVOR+ random-feature attention "
                "is not the softmax attention of Llama-shaped models")
    if not config.causal:
        return "a bidirectional model (model.causal: false) is not a causal language model"
    if config.ffn == "moe":
        moe = config.moe
        if moe.router != "top2":
            return (f"an MoE run with router {moe.router} cannot be exported: Mixtral routes top-2 with renormalised "
                    f"gates (Switch's top-1 keeps the raw probability, expert choice is not causal)")
        if moe.every != 1:
            return (f"an MoE run with MoE in every {moe.every}th block cannot be exported: Mixtral has an MoE in "
                    f"every block")
        if moe.eval_capacity_factor > 0:
            return ("an MoE run with model.moe.eval_capacity_factor > 0 drops tokens at evaluation, which Mixtral "
                    "never does; set it to 0")
    return None


def hf_config(config: ModelConfig, special: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` of the exported model: Llama's, or Mixtral's for an MoE run."""
    heads = config.num_heads
    out = {
        "architectures": ["MixtralForCausalLM" if config.ffn == "moe" else "LlamaForCausalLM"],
        "model_type": "mixtral" if config.ffn == "moe" else "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.resolved_ffn_hidden(),
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": config.dim // heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.context,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "initializer_range": config.init_std,
        "use_cache": True,
        "torch_dtype": "float32",
        **special,
    }
    if config.ffn == "moe":
        out.update(intermediate_size=config.moe.expert_hidden or config.resolved_ffn_hidden(),
                   num_local_experts=config.moe.num_experts, num_experts_per_tok=2, sliding_window=None,
                   output_router_logits=False, router_aux_loss_coef=config.moe.aux_loss_weight,
                   router_jitter_noise=0.0)
        out.pop("mlp_bias")
    return out


def hf_weights(weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The decoder's weights under Hugging Face's names (Llama's, Mixtral's for MoE blocks); everything else
    (the retrieval layers) is left out."""
    D, F = config.dim, config.resolved_ffn_hidden()
    out = {"model.embed_tokens.weight": weights["embed.weight"], "model.norm.weight": weights["norm.weight"]}
    for i in range(config.num_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        qkv = weights[src + "attn.qkv.weight"]  # (3D, D): q, k, v row blocks
        out[dst + "input_layernorm.weight"] = weights[src + "attn_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = weights[src + "ffn_norm.weight"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[dst + f"self_attn.{name}.weight"] = qkv[j * D : (j + 1) * D]
        out[dst + "self_attn.o_proj.weight"] = weights[src + "attn.proj.weight"]
        if config.is_moe_layer(i):
            moe = dst + "block_sparse_moe."
            out[moe + "gate.weight"] = weights[src + "ffn.router.weight"]
            gate_up, down = weights[src + "ffn.experts_gate_up"], weights[src + "ffn.experts_down"]  # (E,D,2F) (E,F,D)
            Fe = down.shape[1]
            for e in range(gate_up.shape[0]):
                out[moe + f"experts.{e}.w1.weight"] = gate_up[e, :, :Fe].t()
                out[moe + f"experts.{e}.w3.weight"] = gate_up[e, :, Fe:].t()
                out[moe + f"experts.{e}.w2.weight"] = down[e].t()
        else:
            gate_up = weights[src + "ffn.gate_up.weight"]  # (2F, D): gate rows, then up rows
            out[dst + "mlp.gate_proj.weight"] = gate_up[:F]
            out[dst + "mlp.up_proj.weight"] = gate_up[F:]
            out[dst + "mlp.down_proj.weight"] = weights[src + "ffn.down.weight"]
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def run_tokenizer(run_dir: Path, record: dict[str, Any], datastore: str | None = None) -> Tokenizer:
    """The tokenizer a run was trained with: ``RUN/tokenizer.json`` (an imported run) or its datastore's, refused
    when the datastore's tokenizer is not the run's."""
    own = run_dir / "tokenizer.json"
    if own.is_file() and datastore is None:
        return load_tokenizer(own)
    info = record.get("datastore") or {}
    path = datastore or info.get("path")
    if not path:
        raise ValueError(f"{run_dir} names no datastore and has no tokenizer.json; give --datastore")
    if not (Path(path) / "tokenizer.json").is_file():
        raise ValueError(f"the run's datastore {path} has no tokenizer.json (moved or deleted?); give --datastore")
    tokenizer = load_tokenizer(Path(path) / "tokenizer.json")
    expected = info.get("tokenizer_fingerprint")
    if expected and tokenizer.fingerprint() != expected:
        raise ValueError(f"datastore {path} was built with another tokenizer than this run's")
    return tokenizer


def readme(run_dir: Path, ckpt: Path, config: ModelConfig, retrieval: bool, tokenizer: Tokenizer) -> str:
    arch = "MixtralForCausalLM" if config.ffn == "moe" else "LlamaForCausalLM"
    lines = [
        f"# {run_dir.name}: a knnformer run exported as `{arch}`", "",
        f"Exported by knnformer {__version__} from `{run_dir.resolve()}`, checkpoint `{ckpt.name}`.", "",
        f"{config.num_layers} layers, width {config.dim}, {config.num_heads} heads, context {config.context}, "
        f"vocabulary {config.vocab_size} ({tokenizer.kind} tokenizer: "
        + ("one token per UTF-8 byte, id = byte value" if tokenizer.kind == "bytes" else "byte-level BPE") + ").",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "```", "",
        ("knnformer's tests check that `transformers` gives the same logits (fp32, allclose) and the same greedy "
         "generation as knnformer on a trained run."), "",
    ]
    if retrieval:
        lines += [("**Retrieval is not exported.** This run was trained with retrieval (RETRO chunked "
                   "cross-attention over retrieved neighbours). Only its decoder is here: the neighbour encoder, "
                   "the cross-attention layers and any learned retriever are left out, so this model is the run "
                   "with retrieval off. Compare it with the `bits per byte, retrieval off` figure of "
                   "`knnformer evaluate`, not with the retrieval-on one."), ""]
    if config.ffn == "moe":
        lines += [("Mixture-of-Experts: top-2 routing, every block, no token dropped (knnformer's evaluation "
                   "setting), as Mixtral computes it."), ""]
    return "\n".join(lines)


def export_run(run_dir: str | Path, out: str | Path, force: bool = False, datastore: str | None = None) -> dict:
    """Write the run's newest checkpoint as a Hugging Face folder ``out``; returns a summary (architecture,
    step, parameters written, whether retrieval layers were left out)."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and not force:
        raise ValueError(f"{out} already exists; pass --force to replace it")
    model, record, ckpt = load_run(run_dir)
    config = model.config
    why = refusal(config)
    if why:
        raise ValueError(why)
    tokenizer = run_tokenizer(run_dir, record, datastore)
    retrieval = run_retrieval(record).enabled
    weights = hf_weights(model.state_dict(), config)
    with writing_folder(out) as tmp:
        special = write_hf_tokenizer(tokenizer, tmp, config.context)
        cfg = hf_config(config, special)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": special["bos_token_id"], "eos_token_id": special["eos_token_id"],
             "pad_token_id": special["pad_token_id"]}, indent=2))
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "README.md").write_text(readme(run_dir, ckpt, config, retrieval, tokenizer))
    return {"architecture": cfg["architectures"][0], "step": int(ckpt.name.split("-")[1]), "out": str(out),
            "parameters": sum(t.numel() for t in weights.values()), "retrieval_left_out": retrieval,
            "tokenizer": tokenizer.kind}
