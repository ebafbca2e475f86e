"""Time and peak memory of ``knnformer prepare`` on the Gutenberg books (47 MB) with a 16k BPE tokenizer.

Runs the CLI as a user would and reads the child's wall time and peak RSS (``os.wait4``). With ``--phases`` it
also runs the same stages in-process, timed one by one (read, split, BPE training, tokenizing and writing), to
show where the time goes. Goal: well under a minute.

    python -m bench.prepare_scale [--phases] [--out bench/results/prepare_scale.json]
        [--data ../shared/data/gutenberg/books] [--split-file ../shared/data/gutenberg/MANIFEST.tsv]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.speed import git_state, machine

HERE = Path(__file__).parent
GOAL_S = 60.0


def cli_args(out: Path, books: Path, manifest: Path) -> list[str]:
    return ["prepare", str(books), "--split-file", str(manifest), "--tokenizer", "bpe", "--vocab-size", "16384",
            "--out", str(out), "--force"]


def run_cli(out: Path, books: Path, manifest: Path) -> dict:
    """The CLI in a child process: wall seconds, peak RSS (MiB) and what it printed."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "knnformer.cli", "-q", *cli_args(out, books, manifest)]
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, peak RSS included
        wall = time.perf_counter() - t0
        child.returncode = os.waitstatus_to_exitcode(status)
        out_f.seek(0)
        err_f.seek(0)
        stdout, stderr = out_f.read(), err_f.read()
    if child.returncode:
        raise RuntimeError(f"prepare failed ({child.returncode}):\n{stderr[-3000:]}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "user_s": usage.ru_utime,
            "sys_s": usage.ru_stime, "stdout": stdout.strip().splitlines()}


def run_phases(out: Path, books: Path, manifest: Path) -> dict:
    """The CLI's stages in this process, each timed."""
    from knnformer.data.corpus import apply_split_file, read_documents, read_split_file
    from knnformer.data.datastore import build_tokenizer, write_datastore

    shutil.rmtree(out, ignore_errors=True)
    phases = {}
    t = time.perf_counter()
    docs, _ = read_documents([str(books)])
    phases["read_s"] = time.perf_counter() - t
    t = time.perf_counter()
    docs = apply_split_file(docs, read_split_file(str(manifest)))
    phases["split_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tokenizer = build_tokenizer(docs, "bpe", 16384)
    phases["bpe_train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    write_datastore(out, docs, tokenizer, [str(books)], overwrite=True)
    phases["tokenize_write_s"] = time.perf_counter() - t
    phases["num_documents"] = len(docs)
    phases["corpus_bytes"] = sum(len(d.text.encode("utf-8")) for d in docs)
    return phases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phases", action="store_true", help="also time each stage in-process")
    p.add_argument("--work", default=str(HERE / "results" / "work"), help="where the datastore goes (gitignored)")
    p.add_argument("--out", default=str(HERE / "results" / "prepare_scale.json"))
    p.add_argument("--data", type=Path, default=Path("../shared/data/gutenberg/books"),
                   help="the books folder (default: %(default)s, from the repository root)")
    p.add_argument("--split-file", type=Path, default=Path("../shared/data/gutenberg/MANIFEST.tsv"),
                   help="the published split (default: %(default)s, from the repository root)")
    args = p.parse_args()
    books, manifest = args.data.resolve(), args.split_file.resolve()
    store = Path(args.work) / "gutenberg-bpe16k"
    store.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": "knnformer " + " ".join(cli_args(store, books, manifest)), "goal_s": GOAL_S, "machine": machine(),
              "git": git_state(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "load_avg_start": os.getloadavg()}
    report["cli"] = run_cli(store, books, manifest)
    report["cli"]["datastore_mib"] = sum(f.stat().st_size for f in store.iterdir()) / 2**20
    report["reaches_goal"] = report["cli"]["wall_s"] < GOAL_S
    print(f"prepare: {report['cli']['wall_s']:.1f}s wall, peak RSS {report['cli']['peak_rss_mib']:.0f} MiB", flush=True)
    if args.phases:
        report["phases"] = run_phases(store, books, manifest)
        print("phases: " + ", ".join(f"{k} {v:.1f}" for k, v in report["phases"].items() if k.endswith("_s")))
    report["load_avg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
