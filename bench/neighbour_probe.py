"""How often the neighbours a datastore hands a valid chunk contain the text that follows it.

    python -m bench.neighbour_probe bench/work/sympy-bpe4096-1of4-store bench/work/sympy-bpe4096-1of4-minilm-store

For a seeded sample of valid chunks c, with the precomputed neighbours of c (K = 2, each with its continuation):
``next_token_recall`` is the share of chunk c + 1's tokens found anywhere in the neighbours' continuations, and
``aligned_copy`` the best share of positions i where a continuation's token i equals chunk c + 1's token i (what
RETRO's relative-position CCA can copy). ``random`` gives both for random train chunks, the floor. Writes
bench/results/neighbour-probe.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def probe(path: str, samples: int, k: int, seed: int) -> dict:
    from knnformer.data.datastore import Datastore
    from knnformer.retrieval.neighbours import load_neighbours

    store = Datastore.open(path)
    nb = load_neighbours(store)
    C = nb.chunk_size
    lo, hi = store.split_range("valid")
    tr_lo, tr_hi = store.split_range("train")
    toks = store.tokens
    ids = nb.window_chunk_ids("valid", np.array([lo]), hi - lo - 2 * C)[0]
    rng = np.random.default_rng(seed)
    sel = rng.choice(len(ids) - 1, min(samples, len(ids) - 1), replace=False)
    batch = nb.for_chunks(ids[sel][:, None], k)
    random_ids = rng.integers(0, (tr_hi - tr_lo) // C - 1, (len(sel), k))

    def scores(conts_of) -> tuple[float, float]:
        recall = aligned = 0.0
        for q, c in enumerate(sel):
            nxt = toks[lo + (c + 1) * C : lo + (c + 2) * C]
            conts = conts_of(q)
            seen = set(np.concatenate(conts).tolist()) if conts else set()
            recall += float(np.mean([t in seen for t in nxt]))
            aligned += max((float(np.mean(x == nxt)) for x in conts if len(x) == len(nxt)), default=0.0)
        return recall / len(sel), aligned / len(sel)

    got = scores(lambda q: [batch.tokens[q, 0, j, C:][batch.mask[q, 0, j, C:]] for j in range(k) if batch.ids[q, 0, j] >= 0])
    floor = scores(lambda q: [toks[tr_lo + (i + 1) * C : tr_lo + (i + 2) * C] for i in random_ids[q]])
    return {"embedder": nb.info["embedder"], "chunk_size": C, "k": k, "samples": len(sel),
            "next_token_recall": round(got[0], 4), "aligned_copy": round(got[1], 4),
            "random": {"next_token_recall": round(floor[0], 4), "aligned_copy": round(floor[1], 4)}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("stores", nargs="+")
    p.add_argument("--samples", type=int, default=3000)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = {"command": " ".join(sys.argv), "stores": {}}
    for path in args.stores:
        out["stores"][path] = r = probe(path, args.samples, args.k, args.seed)
        print(f"{path}: {r['embedder']}: next-token recall {r['next_token_recall']:.3f} (random "
              f"{r['random']['next_token_recall']:.3f}), aligned copy {r['aligned_copy']:.3f} (random "
              f"{r['random']['aligned_copy']:.3f})", flush=True)
    target = ROOT / "bench" / "results" / "neighbour-probe.json"
    target.write_text(json.dumps(out, indent=2))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
