"""The ``knnformer`` command: prepare, train, evaluate, generate and demo.

The CLI owns what the user sees (progress bars, tables, one-line errors); the library modules log.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

logger = logging.getLogger("knnformer")


class Interrupted(Exception):
    pass


def say(message: str) -> None:
    print(f"knnformer: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- prepare

def cmd_prepare(args) -> int:
    from knnformer.data.corpus import apply_split_file, assign_splits, read_documents, read_split_file
    from knnformer.data.datastore import build_tokenizer, write_datastore

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"{out} already exists; pass --force to replace it")
    t0 = time.perf_counter()
    from knnformer.data.corpus import list_files

    total = sum(p.stat().st_size for p, _ in list_files(args.corpus, args.glob))
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading", disable=args.quiet) as bar:
        docs, report = read_documents(args.corpus, args.glob, args.text_field, args.id_field, args.strict, bar.update)
    if report.skipped():
        say(f"skipped {report.num_binary} binary and {report.num_not_utf8} non-UTF-8 files "
            f"(e.g. {report.examples[0]}); pass --strict to refuse them instead")
    if args.split_file:
        docs = apply_split_file(docs, read_split_file(args.split_file))
    else:
        single = len(docs) == 1
        valid = args.valid_fraction if args.valid_fraction is not None else (0.1 if single else 0.05)
        test = args.test_fraction if args.test_fraction is not None else (0.0 if single else 0.05)
        docs = assign_splits(docs, valid, test)
    if not any(d.split == "train" for d in docs):
        raise ValueError("the train split is empty; lower --valid-fraction/--test-fraction or check --split-file")
    if not args.quiet:
        say(f"read {len(docs):,} documents; training the {args.tokenizer} tokenizer" if args.tokenizer == "bpe"
            else f"read {len(docs):,} documents")
    tokenizer = build_tokenizer(docs, args.tokenizer, args.vocab_size)
    with tqdm(total=len(docs), unit="doc", desc="tokenizing", disable=args.quiet) as bar:
        write_datastore(out, docs, tokenizer, [str(Path(c).resolve()) for c in args.corpus], args.force, bar.update)
    from knnformer.data.datastore import Datastore

    store = Datastore.open(out)
    splits = store.manifest["splits"]
    print(f"datastore {out}: {store.manifest['num_tokens']:,} tokens ({tokenizer.kind}, vocab {tokenizer.vocab_size}) "
          f"in {time.perf_counter() - t0:.1f}s")
    for name, info in splits.items():
        print(f"  {name:<5}  {info['documents']:>7,} documents  {info['tokens']:>12,} tokens  {info['bytes']:>12,} bytes")
    return 0


# ---------------------------------------------------------------- train

def resolve_train_config(args, store, run_dir: Path):
    from knnformer.config import apply_overrides, config_from_dict, load_config

    if args.resume:
        record_path = run_dir / "config.json"
        if not record_path.exists():
            raise ValueError(f"{run_dir} has no run to resume (no config.json)")
        record = json.loads(record_path.read_text())
        if record["datastore"]["tokenizer_fingerprint"] != store.manifest["tokenizer"]["fingerprint"]:
            raise ValueError(f"{store.path} was built with another tokenizer than the run in {run_dir}")
        values = apply_overrides(record["config"], args.set or [], strict=True)
        if args.config:
            say("--config is ignored with --resume: the run's saved config is used (change it with --set)")
        return config_from_dict(values)
    config = load_config(args.config, args.set or [])
    vocab = store.tokenizer.vocab_size
    if config.model.vocab_size == 0:
        config.model.vocab_size = vocab
    elif config.model.vocab_size < vocab:
        raise ValueError(f"model.vocab_size={config.model.vocab_size} is smaller than the datastore's tokenizer "
                         f"({vocab}); leave it at 0 to take it from the datastore")
    return config


def write_events(bar, row: dict) -> None:
    """Print the training events of a metrics row above the progress bar: Performer redraws, index refreshes."""
    if row.get("redraw"):
        bar.write(f"step {row['step']:>6}: drew new Performer random features")
    if "refresh" in row:
        started = row.get("refresh_started", row["step"] - 1)
        how = (f"re-embedded and re-indexed in {row['refresh_seconds']:.1f} s (training paused)"
               if started == row["step"] - 1 else
               f"re-embedded and re-indexed in the background from the weights of step {started} "
               f"({row.get('refresh_cpu_seconds', 0):.1f} s CPU), training paused {row['refresh_seconds']:.1f} s")
        bar.write(f"step {row['step']:>6}: refresh {row['refresh']}: {how}, {row['refresh_changed']:.1%} of chunks "
                  f"got new neighbours, index recall@10 {row['refresh_recall']:.3f}")


def train_with_progress(run_dir: Path, store, config, resume: bool, quiet: bool = False) -> "object":
    from knnformer.train.trainer import train

    cfg = config.train
    start = 0
    if resume:
        from knnformer.run.checkpoint import latest_checkpoint

        start = int(latest_checkpoint(run_dir).name.split("-")[1])
    bar = tqdm(total=cfg.steps, initial=start, unit="step", desc="training", disable=quiet, dynamic_ncols=True)
    rates: list[float] = []

    def on_step(row):
        rates.append(row["tokens_per_s"])
        postfix = {"loss": f"{row['loss']:.3f}", "tok/s": f"{sorted(rates[-50:])[len(rates[-50:]) // 2]:,.0f}"}
        write_events(bar, row)
        if "moe" in row:  # MoE: the weighted auxiliary loss and the mean dropped-token share over its layers
            postfix["aux"] = f"{row['aux_loss']:.4f}"
            postfix["drop"] = f"{sum(m['dropped'] for m in row['moe']) / len(row['moe']):.1%}"
        if "valid_loss" in row:
            bar.write(f"step {row['step']:>6}: train loss {row['loss']:.4f}  valid loss {row['valid_loss']:.4f}  "
                      f"valid bits/byte {row['valid_bpb']:.4f}")
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)

    try:
        result = train(run_dir, store, config, resume=resume, on_step=on_step)
    finally:
        bar.close()
    if result.interrupted:
        say(f"stopped at step {result.step}; checkpoint saved. Continue with `knnformer train {store.path} "
            f"--out {run_dir} --resume`")
        raise Interrupted
    return result


def cmd_train(args) -> int:
    from knnformer.data.datastore import Datastore

    store = Datastore.open(args.datastore)
    run_dir = Path(args.out)
    config = resolve_train_config(args, store, run_dir)
    if not args.quiet:
        say(f"training {config.model.num_layers} layers x {config.model.dim} wide, context {config.model.context}, "
            f"{config.train.steps} steps of {config.train.batch_size * config.train.grad_accum} sequences "
            f"-> {run_dir}")
    result = train_with_progress(run_dir, store, config, args.resume, args.quiet)
    print(f"trained to step {result.step}: train loss {result.last_loss:.4f}"
          + (f", valid loss {result.valid['valid_loss']:.4f} ({result.valid['valid_bpb']:.4f} bits/byte)"
             if result.valid else ""))
    return 0


# ---------------------------------------------------------------- evaluate / generate

def cmd_evaluate(args) -> int:
    from knnformer.eval.evaluate import evaluate_run, format_table, to_json

    bars = []

    def factory(total, what=""):
        bars.append(tqdm(total=total, unit="tok", unit_scale=True, desc=f"scoring {args.split} {what}".strip(),
                         disable=args.json or args.quiet))
        return bars[-1].update

    try:
        if args.knn_lm:
            from knnformer.eval import knnlm

            if args.stride:
                raise ValueError("--knn-lm scores in consecutive windows; drop --stride")
            result = knnlm.evaluate_knn_lm(args.run, args.split, args.datastore, args.batch_size, factory,
                                           args.retrieval)
            table = knnlm.format_table(result)
        else:
            result = evaluate_run(args.run, args.split, args.stride, args.datastore, args.batch_size, factory,
                                  args.retrieval, args.neighbour_gain)
            table = format_table(result)
    finally:
        for bar in bars:
            bar.close()
    print(to_json(result) if args.json else table)
    return 0


def cmd_generate(args) -> int:
    from knnformer.run.record import load_run, open_run_datastore
    from knnformer.serve.generate import RetrievingGenerator, sample_ids, stream_text

    model, record, _ = load_run(args.run)
    store = open_run_datastore(record, args.datastore)
    tokenizer = store.tokenizer
    prompt = args.prompt if args.prompt is not None else ""
    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [tokenizer.eot_id] if tokenizer.eot_id is not None else tokenizer.encode("\n")
    if len(ids) > model.config.context:
        raise ValueError(f"the prompt is {len(ids)} tokens, longer than the model's context of "
                         f"{model.config.context}; shorten it")
    retrieving = None
    if record["config"]["retrieval"]["enabled"] and args.retrieval != "off" or args.show_neighbours or args.json:
        retrieving = RetrievingGenerator.for_run(model, store, args.run, record, args.retrieval, args.k)
        new_ids = retrieving.sample(ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                                    tokenizer.eot_id)
    else:
        new_ids = sample_ids(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                             tokenizer.eot_id)
    generated: list[int] = []

    def tee(source):
        for i in source:
            generated.append(i)
            yield i

    if args.json:
        text = "".join(stream_text(tokenizer, tee(new_ids)))
    else:
        sys.stdout.write(prompt)
        sys.stdout.flush()
        for piece in stream_text(tokenizer, tee(new_ids)):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    if retrieving is not None and (args.show_neighbours or args.json):
        chunks = retrieving.provenance(ids + generated, len(ids))
        latency = sorted(retrieving.latencies_ms)
        if args.json:
            print(json.dumps({"prompt": prompt, "text": text, "retrieval": retrieving.feed_model,
                              "chunks": chunks, "retrievals": len(latency),
                              "retrieval_ms_median": latency[len(latency) // 2] if latency else None}, indent=2))
        else:
            print(f"\n-- neighbours that served each generated chunk ({len(latency)} retrievals, median "
                  f"{latency[len(latency) // 2] if latency else 0:.1f} ms each):")
            for c in chunks:
                print(f"chunk {c['chunk']}: {c['text']!r}")
                for j, n in enumerate(c["neighbours"], 1):
                    snippet = n["text"].replace("\n", "\\n")[:60]
                    print(f"   [{j}] {n['doc_id']} @ byte {n['byte_offset']:,} (score {n['score']:.3f}): {snippet}")
                if not c["neighbours"]:
                    print("   (none: the first chunk of the text has nothing before it)")
    elif args.json:
        print(json.dumps({"prompt": prompt, "text": text, "retrieval": False}, indent=2))
    return 0


# ---------------------------------------------------------------- demo

def cmd_demo(args) -> int:
    from knnformer.cli.demo import run_demo

    run_demo(Path(args.out), fresh=args.fresh, steps=args.steps)
    return 0


# ---------------------------------------------------------------- lra

def cmd_lra(args) -> int:
    from knnformer.experiments.lra import lra_config, train_listops

    overrides = list(args.set or [])
    if args.attention:
        overrides.append(f"model.attention={args.attention}")
    config = lra_config(args.preset, overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.quiet:
        d = config.data
        say(f"ListOps ({args.preset}): {d.num_train:,} / {d.num_valid:,} / {d.num_test:,} expressions of "
            f"{d.min_length + 1} to {d.max_length - 1} tokens; {config.model.attention} attention, "
            f"{config.model.num_layers} layers x {config.model.dim}, {config.train.steps} steps -> {out}")
    bar = tqdm(total=config.train.steps, unit="step", desc="training", disable=args.quiet, dynamic_ncols=True)

    def on_step(row):
        write_events(bar, row)
        if "valid_accuracy" in row:
            bar.write(f"step {row['step']:>6}: train loss {row['loss']:.4f}  valid accuracy {row['valid_accuracy']:.2%}")
        bar.set_postfix({"loss": f"{row['loss']:.3f}"}, refresh=False)
        bar.update(1)

    try:
        result = train_listops(config, out, on_step)
    finally:
        bar.close()
    print(f"ListOps {args.preset}, {result['attention']} attention: test accuracy {result['test_accuracy']:.2%} "
          f"(valid {result['valid_accuracy']:.2%}, majority class {result['majority_class_test_accuracy']:.2%}); "
          f"training {result['train_seconds']:.0f} s, {result['ms_per_step']:.0f} ms/step, "
          f"{result['train_tokens_per_s']:,.0f} tokens/s -> {out / ('result-' + result['attention'] + '.json')}")
    return 0


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from knnformer import __version__

    p = argparse.ArgumentParser(prog="knnformer", description="Language models that read their own corpus.")
    p.add_argument("--version", action="version", version=f"knnformer {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prepare", help="tokenize a corpus into a datastore")
    s.add_argument("corpus", nargs="+", help="text files, folders (see --glob) or JSONL files")
    s.add_argument("--out", required=True, help="datastore folder to write")
    s.add_argument("--glob", default="**/*", help="which files to read under a folder (default: all)")
    s.add_argument("--text-field", default=None, help="JSONL field holding the text (default: text)")
    s.add_argument("--id-field", default="id", help="JSONL field holding a record's id (default: id)")
    s.add_argument("--tokenizer", choices=["bytes", "bpe"], default="bytes")
    s.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    s.add_argument("--split-file", default=None, help="TSV/CSV with a file column and a split column")
    s.add_argument("--valid-fraction", type=float, default=None,
                   help="share of documents in valid (default 0.05; 0.1 by position for a single document)")
    s.add_argument("--test-fraction", type=float, default=None,
                   help="share of documents in test (default 0.05; 0 for a single document)")
    s.add_argument("--strict", action="store_true", help="refuse binary or non-UTF-8 files instead of skipping")
    s.add_argument("--force", action="store_true", help="replace an existing datastore")
    s.set_defaults(func=cmd_prepare)

    from knnformer.cli.index import add_index_parser

    add_index_parser(sub)
    from knnformer.cli.inspect import add_inspect_parser

    add_inspect_parser(sub)

    s = sub.add_parser("train", help="train a model on a datastore")
    s.add_argument("datastore")
    s.add_argument("--out", required=True, help="run folder")
    s.add_argument("--config", default=None, help="preset name (tiny, shakespeare-char, small) or YAML path")
    s.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override a config field")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", help="loss, perplexity and bits per byte over a whole split")
    s.add_argument("run")
    s.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    s.add_argument("--stride", type=int, default=None, help="sliding-window stride (default: the context)")
    s.add_argument("--datastore", default=None, help="datastore to score (default: the run's own)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--retrieval", choices=["auto", "on", "off"], default="auto",
                   help="score with the run's retrieval on (also reports off) or as a plain LM (default: on for "
                        "a retrieval run)")
    s.add_argument("--knn-lm", action="store_true",
                   help="interpolate with a kNN-LM over the run's train hidden states (lambda, k and temperature "
                        "tuned on data not scored: valid for test, valid's first half for its second)")
    s.add_argument("--neighbour-gain", type=int, default=8, metavar="N",
                   help="measure how much each neighbour lowered the loss of the chunk it served on N windows "
                        "(one extra forward per neighbour and chunk; 0: skip; default 8)")
    s.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("generate", help="sample text from a run")
    s.add_argument("run")
    s.add_argument("--prompt", default="")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=200)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--datastore", default=None, help="datastore holding the tokenizer (default: the run's own)")
    s.add_argument("--retrieval", choices=["auto", "off"], default="auto",
                   help="a retrieval run retrieves at every chunk boundary unless this is off")
    s.add_argument("--show-neighbours", action="store_true",
                   help="after the text, list the neighbours (document, offset, score, snippet) of every chunk")
    s.add_argument("--k", type=int, default=2, help="neighbours to show for a plain LM (default 2)")
    s.add_argument("--json", action="store_true", help="print the text and its neighbours as one JSON object")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("lra", help="Long Range Arena tasks, generated offline: train and score a classifier")
    s.add_argument("task", choices=["listops"])
    s.add_argument("--preset", choices=["small", "published"], default="small",
                   help="small: minutes on one CPU thread; published: LRA's size (96k expressions up to 2000 "
                        "tokens, 6 x 512), for a GPU")
    s.add_argument("--attention", choices=["softmax", "performer"], default=None,
                   help="the blocks' attention (default: the preset's, softmax)")
    s.add_argument("--out", default="lra-listops", help="folder for the generated data and the results")
    s.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override a field of the data, model or train section")
    s.set_defaults(func=cmd_lra)

    s = sub.add_parser("demo", help="prepare, train, evaluate and sample on Python's own standard library")
    s.add_argument("--out", default="knnformer-demo", help="folder for the demo's datastore and run")
    s.add_argument("--steps", type=int, default=None, help="training steps (default: the demo preset's)")
    s.add_argument("--fresh", action="store_true", help="start the demo run over instead of resuming it")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as e:
        say(f"error: {e}")
        return 2
    except Interrupted:
        return 130
    except KeyboardInterrupt:
        say("interrupted; nothing half-written was kept")
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
