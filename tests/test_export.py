"""Export to Hugging Face and back: ``transformers`` (a test-only dependency, CPU, reading only the exported
folder) gives the logits and the greedy generation of the knnformer run it came from; a retrieval run exports
its decoder, whose loss is the run's retrieval-off figure; MoE exports as Mixtral; what cannot be exported or
imported is refused with a one-line error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_datastore
from safetensors.torch import load_file, save_file

from knnformer.cli import main
from knnformer.config import ModelConfig, MoEConfig, load_config
from knnformer.eval.scoring import window_plan
from knnformer.export.hf import export_run, refusal
from knnformer.export.importer import import_hf
from knnformer.run.record import load_run
from knnformer.serve.generate import sample_ids
from knnformer.train.trainer import train


def train_run(run_dir: Path, store, steps: int = 20, *overrides: str) -> Path:
    config = load_config("tiny", [f"train.steps={steps}", f"train.checkpoint_interval={steps}",
                                  "train.eval_interval=0", *overrides])
    config.model.vocab_size = store.tokenizer.vocab_size
    train(run_dir, store, config)
    return run_dir


def hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def valid_windows(store, context: int, rows: int = 4) -> torch.Tensor:
    tokens = store.split_tokens("valid")
    return torch.from_numpy(np.asarray(tokens[: rows * context], dtype=np.int64)).view(rows, context)


def assert_same_generation(model, hf, prompt: list[int], new: int, eot: int | None) -> None:
    ours = list(sample_ids(model, prompt, new, temperature=0.0, stop_id=eot))
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=new, do_sample=False, eos_token_id=eot, pad_token_id=eot)
    assert out[0, len(prompt):].tolist() == ours
    assert len(ours) > 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny trained run for each tokenizer."""
    tmp = tmp_path_factory.mktemp("export")
    out = {}
    for kind in ("bytes", "bpe"):
        store = make_datastore(tmp, kind)
        out[kind] = (train_run(tmp / f"run-{kind}", store), store)
    return out


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_transformers_gives_the_runs_logits_tokens_and_greedy_text(tmp_path, runs, kind):
    from transformers import AutoTokenizer

    run_dir, store = runs[kind]
    summary = export_run(run_dir, tmp_path / "hf")
    assert summary["architecture"] == "LlamaForCausalLM" and not summary["retrieval_left_out"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    model, _, _ = load_run(run_dir)
    mc = model.config
    assert config["rms_norm_eps"] == mc.norm_eps and config["rope_theta"] == mc.rope_theta
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] == mc.num_heads
    hf = hf_model(tmp_path / "hf")
    assert type(hf).__name__ == "LlamaForCausalLM"
    x = valid_windows(store, mc.context)
    with torch.no_grad():
        ours, theirs = model(x)[0], hf(x).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (ours - theirs).abs().max()
    # the tokenizer files: AutoTokenizer encodes and decodes as knnformer does, Unicode included
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    text = "Document 3 — café naïve.\nthe model reads its corpus ✓"
    assert tok(text)["input_ids"] == store.tokenizer.encode(text)
    assert tok.decode(store.tokenizer.encode(text)) == text
    prompt = store.tokenizer.encode("the model reads")[:10]
    assert_same_generation(model, hf, prompt, mc.context - len(prompt), store.tokenizer.eot_id)


def test_the_parity_check_sees_a_wrong_rotary_base(tmp_path, runs):
    """The logits test can fail: the same weights with another rope_theta give other logits."""
    run_dir, store = runs["bytes"]
    export_run(run_dir, tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    config["rope_theta"] = 500.0
    config["rope_parameters"]["rope_theta"] = 500.0
    path.write_text(json.dumps(config))
    model, _, _ = load_run(run_dir)
    x = valid_windows(store, model.config.context)
    with torch.no_grad():
        assert not torch.allclose(model(x)[0], hf_model(tmp_path / "hf")(x).logits, atol=1e-4)


def test_a_retrieval_run_exports_its_decoder_with_the_retrieval_off_loss(tmp_path, capsys):
    from knnformer.eval.evaluate import evaluate_run
    from knnformer.retrieval.build import index_datastore

    store = make_datastore(tmp_path, "bytes", num_docs=8)
    index_datastore(store.path, embedder="bytes-hash", index="flat", k=2, chunk_size=16, exclude_window=48)
    run_dir = train_run(tmp_path / "run", store, 12, "retrieval.enabled=true")
    assert main(["-q", "export", str(run_dir), "--hf", str(tmp_path / "hf")]) == 0
    assert "without the retrieval layers" in capsys.readouterr().err
    assert "Retrieval is not exported" in (tmp_path / "hf" / "README.md").read_text()
    names = load_file(tmp_path / "hf" / "model.safetensors")
    assert not any("retrieval" in n or "cross" in n for n in names)
    result = evaluate_run(run_dir, "valid", retrieval="on", gain_windows=0)
    hf = hf_model(tmp_path / "hf")
    tokens = np.asarray(store.split_tokens("valid"), dtype=np.int64)
    context = load_run(run_dir)[0].config.context
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin, first, n in window_plan(len(tokens), context, context):
            x = torch.from_numpy(tokens[begin : begin + n + 1])
            losses = F.cross_entropy(hf(x[None, :-1]).logits[0].float(), x[1:], reduction="none").double()
            nll += float(losses[first:].sum())
            count += n - first
    assert count == result["tokens"]
    assert nll / count == pytest.approx(result["retrieval_off"]["loss"], rel=1e-6)
    assert not math.isclose(nll / count, result["loss"], rel_tol=1e-6)  # the retrieval-on figure is another


def test_an_moe_run_exports_as_mixtral_with_parity(tmp_path):
    store = make_datastore(tmp_path, "bytes")
    run_dir = train_run(tmp_path / "run", store, 12, "model.ffn=moe", "model.moe.num_experts=4")
    assert export_run(run_dir, tmp_path / "hf")["architecture"] == "MixtralForCausalLM"
    hf = hf_model(tmp_path / "hf")
    assert type(hf).__name__ == "MixtralForCausalLM"
    model, _, _ = load_run(run_dir)
    x = valid_windows(store, model.config.context)
    with torch.no_grad():
        ours, theirs = model(x)[0], hf(x).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (ours - theirs).abs().max()
    assert_same_generation(model, hf, list(b"the model"), 20, None)


@pytest.mark.parametrize("changes, words", [
    ({"attention": "performer"}, "Performer"),
    ({"ffn": "moe", "moe": MoEConfig(router="top1")}, "top1"),
    ({"ffn": "moe", "moe": MoEConfig(router="expert_choice")}, "expert_choice"),
    ({"ffn": "moe", "moe": MoEConfig(every=2)}, "every 2th block"),
    ({"ffn": "moe", "moe": MoEConfig(eval_capacity_factor=1.0)}, "drops tokens"),
])
def test_what_transformers_cannot_compute_is_refused(changes, words):
    assert words in refusal(ModelConfig(vocab_size=256, **changes))
    assert refusal(ModelConfig(vocab_size=256, ffn="moe")) is None


def test_a_performer_run_is_refused_with_one_line(tmp_path, capsys):
    store = make_datastore(tmp_path, "bytes")
    run_dir = train_run(tmp_path / "run", store, 2, "model.attention=performer")
    assert main(["-q", "export", str(run_dir), "--hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("knnformer: error: a Performer run") and err.count("\n") == 1
    assert not (tmp_path / "hf").exists()


def test_import_hf_round_trips_an_exported_run(tmp_path, runs, capsys):
    from knnformer.data.tokenizer import ByteTokenizer
    from knnformer.export.hf import run_tokenizer

    run_dir, store = runs["bytes"]
    export_run(run_dir, tmp_path / "hf")
    assert main(["-q", "import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert "tokenizer: bytes" in capsys.readouterr().out
    original, _, _ = load_run(run_dir)
    back, record, _ = load_run(tmp_path / "back")
    assert isinstance(run_tokenizer(tmp_path / "back", record), ByteTokenizer)
    x = valid_windows(store, original.config.context)
    with torch.no_grad():
        assert torch.equal(original(x)[0], back(x)[0])
    export_run(tmp_path / "back", tmp_path / "hf2")  # and out again, the same tensors
    first, second = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # evaluated on a datastore with its tokenizer, it scores as the run it came from, and it trains on from step 0
    assert main(["-q", "evaluate", str(tmp_path / "back"), "--json"]) == 2
    assert "names no datastore" in capsys.readouterr().err
    scores = []
    for run in (run_dir, tmp_path / "back"):
        assert main(["-q", "evaluate", str(run), "--json", "--datastore", str(store.path)]) == 0
        scores.append(json.loads(capsys.readouterr().out)["loss"])
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)
    assert main(["-q", "train", str(store.path), "--out", str(tmp_path / "back"), "--resume",
                 "--set", "train.steps=3"]) == 0
    first_loss = json.loads((tmp_path / "back" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert first_loss < 4.5  # the imported model's loss, not a fresh model's ln 256 = 5.55


def save_llama(folder: Path, tie: bool = True, kv_heads: int = 2):
    """A randomly initialised Llama written by transformers itself (grouped-query attention, its own rotary
    base and norm eps)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=48,
                         rms_norm_eps=1e-6, rope_theta=5000.0, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model


def test_import_hf_reads_a_grouped_query_llama_written_by_transformers(tmp_path):
    hf = save_llama(tmp_path / "llama")
    summary = import_hf(tmp_path / "llama", tmp_path / "run")
    assert summary["key_value_heads"] == 2 and summary["heads"] == 4 and summary["tokenizer"] is None
    model, _, _ = load_run(tmp_path / "run")
    assert model.config.context == 48 and model.config.norm_eps == 1e-6 and model.config.rope_theta == 5000.0
    x = torch.randint(0, 300, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x)[0], hf(x).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (ours - theirs).abs().max()
    assert_same_generation(model, hf, [5, 17, 200, 3], 30, None)


def test_bad_export_and_import_inputs_give_one_line_errors(tmp_path, runs, capsys):
    run_dir, _ = runs["bytes"]

    def error(*argv) -> str:
        assert main(["-q", *map(str, argv)]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("knnformer: error: ") and err.count("\n") == 1, err
        return err

    (tmp_path / "empty").mkdir()
    assert "has no checkpoint" in error("export", tmp_path / "empty", "--hf", tmp_path / "out")
    assert "does not exist" in error("export", tmp_path / "nothing", "--hf", tmp_path / "out")
    (tmp_path / "out").mkdir()
    assert "already exists; pass --force" in error("export", run_dir, "--hf", tmp_path / "out")
    assert main(["-q", "export", str(run_dir), "--hf", str(tmp_path / "out"), "--force"]) == 0
    capsys.readouterr()
    assert "already exists; pass --force" in error("import-hf", tmp_path / "out", "--out", run_dir)
    assert "config.json is missing" in error("import-hf", tmp_path / "empty", "--out", tmp_path / "r1")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert "not Llama-shaped: model_type is 'gpt2'" in error("import-hf", gpt2, "--out", tmp_path / "r2")
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    err = error("import-hf", gpt2, "--out", tmp_path / "r2")
    assert "lacks vocab_size, intermediate_size, num_hidden_layers, num_attention_heads" in err
    save_llama(tmp_path / "llama")
    weights = load_file(tmp_path / "llama" / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "llama" / "model.safetensors")
    capsys.readouterr()  # transformers' own progress bar while saving
    assert "lack model.layers.1.mlp.up_proj.weight" in error("import-hf", tmp_path / "llama", "--out", tmp_path / "r3")
    (tmp_path / "llama" / "model.safetensors").unlink()
    assert "has no safetensors weights" in error("import-hf", tmp_path / "llama", "--out", tmp_path / "r3")
    save_llama(tmp_path / "untied", tie=False)
    capsys.readouterr()
    assert "lm_head.weight) differs from the embedding" in error("import-hf", tmp_path / "untied", "--out",
                                                                 tmp_path / "r4")
    assert not any((tmp_path / name).exists() for name in ("r1", "r2", "r3", "r4"))


def test_an_imported_model_starts_a_retrieval_run(tmp_path, runs, capsys):
    """import-hf, then `train --init-from`: the new run's decoder is the imported one, its retrieval layers new."""
    from knnformer.retrieval.build import index_datastore

    run_dir, _ = runs["bytes"]
    export_run(run_dir, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "imported", context=32)
    store = make_datastore(tmp_path, "bytes", num_docs=8)
    index_datastore(store.path, embedder="bytes-hash", index="flat", k=2, chunk_size=16, exclude_window=48)
    argv = ["-q", "train", str(store.path), "--out", str(tmp_path / "retro"), "--config", "tiny", "--init-from",
            str(tmp_path / "imported"), "--set", "retrieval.enabled=true", "--set", "train.steps=3"]
    assert main(argv) == 0
    first_loss = json.loads((tmp_path / "retro" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert first_loss < 4.5  # the imported decoder's loss, not a fresh model's ln 256 = 5.55
    model, record, _ = load_run(tmp_path / "retro")
    assert model.retrieval is not None and record["init_from"] == str((tmp_path / "imported").resolve())
    capsys.readouterr()
    assert main([*argv[:4], str(tmp_path / "other"), *argv[5:], "--set", "model.dim=64"]) == 2
    assert "its decoder does not fit this model" in capsys.readouterr().err
