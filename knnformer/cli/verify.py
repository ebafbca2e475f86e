"""``knnformer verify DS|RUN``: check every file of a datastore or a run by content (``run/verify.py``); one line
per check, exit status 1 when any failed."""

from __future__ import annotations

import argparse


def cmd_verify(args) -> int:
    from knnformer.run.verify import verify

    results = verify(args.path)
    for ok, line in results:
        print(f"{'ok  ' if ok else 'FAIL'}  {line}")
    failed = sum(not ok for ok, _ in results)
    print(f"{args.path}: {len(results) - failed} checks passed, {failed} failed")
    return 1 if failed else 0


def add_verify_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser("verify", help="check a datastore's or a run's files by content (checksums, ranges, leakage)")
    s.add_argument("path", help="a datastore or a run folder")
    s.set_defaults(func=cmd_verify)
    return s
