"""``knnformer serve RUN``: an OpenAI-compatible server that cites its sources, with a page at ``/`` that shows
them (``knnformer/serve/server.py``). Binds 127.0.0.1 unless ``--host`` names another address."""

from __future__ import annotations

import argparse

from knnformer.cli.common import say

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def cmd_serve(args) -> int:
    import uvicorn

    from knnformer.serve.server import create_app, open_service

    if args.host not in LOCAL_HOSTS:
        say(f"warning: serving on {args.host}: anyone who can reach this address can use the model and read the "
            f"datastore's text; there is no authentication")
    service = open_service(args.run, args.datastore, args.max_batch, args.max_queue, args.max_tokens,
                           args.retrieval_db)
    info = service.info
    say(f"serving {info['run']} ({info['parameters']:,} parameters, retrieval "
        f"{'on' if info['retrieval'] else 'off (citations only)'}) on http://{args.host}:{args.port}/")
    try:
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=5)
    finally:
        service.close()
    return 0


def add_serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", help="an OpenAI-compatible server that cites its sources, and a page that shows them")
    s.add_argument("run")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--datastore", default=None, help="datastore holding the tokenizer and index (default: the run's)")
    s.add_argument("--max-batch", type=int, default=16, help="requests generating at once (rows of the batch)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond those; more get 429")
    s.add_argument("--max-tokens", type=int, default=1024, help="the largest max_tokens a request may ask for")
    s.add_argument("--retrieval-db", action="extend", nargs="+", default=[], metavar="DB",
                   help="retrieval databases (prepared with --tokenizer-from RUN and indexed) to retrieve from and "
                        "cite instead of the run's datastore; a RETRO run reads them, a plain LM cites them")
    s.set_defaults(func=cmd_serve)
    return s
