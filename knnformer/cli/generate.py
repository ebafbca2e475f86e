"""``knnformer generate RUN``: sample text from a run and stream it to stdout. A retrieval run retrieves at
every chunk boundary as it was trained to (``RetrievingGenerator.for_run``); ``--show-neighbours`` lists the
neighbours that served each generated chunk, and ``--json`` prints the text and its neighbours as one object."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from knnformer.cli.values import check_generate_args
from knnformer.run.record import run_retrieval


def prompt_ids(tokenizer, prompt: str, context: int) -> list[int]:
    """The prompt's token ids; an empty prompt starts from the end-of-text token (or a newline)."""
    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [tokenizer.eot_id] if tokenizer.eot_id is not None else tokenizer.encode("\n")
    if len(ids) > context:
        raise ValueError(f"the prompt is {len(ids)} tokens, longer than the model's context of "
                         f"{context}; shorten it")
    return ids


def print_neighbours(chunks: list[dict], latency: list[float]) -> None:
    """The neighbours that served each generated chunk, after the text."""
    print(f"\n-- neighbours that served each generated chunk ({len(latency)} retrievals, median "
          f"{latency[len(latency) // 2] if latency else 0:.1f} ms each):")
    for c in chunks:
        print(f"chunk {c['chunk']}: {c['text']!r}")
        for j, n in enumerate(c["neighbours"], 1):
            snippet = n["text"].replace("\n", "\\n")[:60]
            where = f"{Path(n['database']).name}:" if n.get("database") else ""
            print(f"   [{j}] {where}{n['doc_id']} @ byte {n['byte_offset']:,} (score {n['score']:.3f}): {snippet}")
        if not c["neighbours"]:
            print("   (none: the first chunk of the text has nothing before it)")


def cmd_generate(args) -> int:
    from knnformer.run.record import load_run, open_run_datastore
    from knnformer.runtime import resolve_device
    from knnformer.serve.generate import RetrievingGenerator, sample_ids, stream_text

    check_generate_args(args)  # --max-new-tokens 0, --top-p 1.5: refused before the model is loaded
    model, record, _ = load_run(args.run, str(resolve_device(args.device or "cpu")))
    store = open_run_datastore(record, args.datastore)
    tokenizer = store.tokenizer
    prompt = args.prompt if args.prompt is not None else ""
    ids = prompt_ids(tokenizer, prompt, model.config.context)
    retrieving = None
    if args.retrieval_db:
        retrieving = RetrievingGenerator.for_databases(model, store, args.run, record, args.retrieval_db,
                                                       args.retrieval, args.mode, args.k)
        new_ids = retrieving.sample(ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                                    tokenizer.eot_id)
    elif run_retrieval(record).enabled and args.retrieval != "off" or args.show_neighbours or args.json:
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
            print(json.dumps({"prompt": prompt, "text": text,
                              "retrieval": retrieving.feed_model or retrieving.in_context,
                              "chunks": chunks, "retrievals": len(latency),
                              "retrieval_ms_median": latency[len(latency) // 2] if latency else None}, indent=2))
        else:
            print_neighbours(chunks, latency)
    elif args.json:
        print(json.dumps({"prompt": prompt, "text": text, "retrieval": False}, indent=2))
    return 0


def add_generate_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
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
    s.add_argument("--k", type=int, default=2,
                   help="neighbours to show for a plain LM, or to place in context with --mode in-context (default 2)")
    s.add_argument("--retrieval-db", action="extend", nargs="+", default=[], metavar="DB",
                   help="retrieval databases (prepared with --tokenizer-from RUN and indexed) to retrieve from "
                        "instead of the run's datastore; several are searched as one")
    s.add_argument("--mode", choices=["auto", "cca", "in-context"], default="auto",
                   help="how the run reads --retrieval-db: cross-attention (a RETRO run) or the neighbours' text "
                        "before the window (any run); auto: cca for a RETRO run, else in-context")
    s.add_argument("--json", action="store_true", help="print the text and its neighbours as one JSON object")
    s.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default cpu)")
    s.set_defaults(func=cmd_generate)
    return s
