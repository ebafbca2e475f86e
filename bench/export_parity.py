"""Export parity on trained runs (issue 16): each run is exported with ``knnformer export`` and loaded by
``transformers`` (CPU, fp32, from the folder only); over the whole valid split, in the consecutive windows
``knnformer evaluate`` scores, we compare every logit (largest absolute difference), the loss and bits per byte
(knnformer's retrieval-off figure for a retrieval run), and greedy generation from prompts taken along valid.

    python -m bench.export_parity RUN [RUN ...] [--prompts 20] [--out bench/results/export-parity.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.speed import git_state, machine
from knnformer.eval.scoring import window_plan
from knnformer.export.hf import export_run
from knnformer.run.record import load_run, open_run_datastore
from knnformer.serve.generate import sample_ids


@torch.no_grad()
def compare(run: Path, prompts: int, batch: int = 16) -> dict:
    from transformers import AutoModelForCausalLM

    model, record, ckpt = load_run(run)
    store = open_run_datastore(record)
    tokens = np.asarray(store.split_tokens("valid"), dtype=np.int64)
    context = model.config.context
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = export_run(run, Path(tmp) / "hf")
        export_s = time.perf_counter() - t0
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", local_files_only=True).eval()
    plan = window_plan(len(tokens), context, context)
    token_bytes = torch.from_numpy(store.tokenizer.token_bytes)
    nll = {"knnformer": 0.0, "transformers": 0.0}
    count, num_bytes, max_diff = 0, 0, 0.0
    by_length: dict[int, list] = {}
    for window in plan:  # all of the context's length but the last
        by_length.setdefault(window[2], []).append(window)
    batches = [(n, ws[i : i + batch]) for n, ws in by_length.items() for i in range(0, len(ws), batch)]
    for n, group in batches:
        rows = torch.from_numpy(np.stack([tokens[b : b + n + 1] for b, _, _ in group]))
        x, y = rows[:, :-1], rows[:, 1:]
        ours, theirs = model(x)[0], hf(x).logits
        max_diff = max(max_diff, float((ours - theirs).abs().max()))
        for name, logits in (("knnformer", ours), ("transformers", theirs)):
            losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(len(group), n).double()
            nll[name] += sum(float(losses[r, first:].sum()) for r, (_, first, _) in enumerate(group))
        count += sum(n - first for _, first, _ in group)
        num_bytes += sum(int(token_bytes[y[r, first:]].sum()) for r, (_, first, _) in enumerate(group))
    eot = store.tokenizer.eot_id
    same, new_tokens = 0, context - 16
    starts = np.linspace(0, len(tokens) - 17, prompts).astype(int)
    for s in starts:
        prompt = tokens[s : s + 16].tolist()
        ours = list(sample_ids(model, prompt, new_tokens, temperature=0.0, stop_id=eot))
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 16, dtype=torch.long),
                          max_new_tokens=new_tokens, do_sample=False, eos_token_id=eot, pad_token_id=eot)
        same += out[0, 16:].tolist() == ours
    loss = {k: v / count for k, v in nll.items()}
    return {"run": str(run), "checkpoint": ckpt.name, "architecture": summary["architecture"],
            "retrieval_left_out": summary["retrieval_left_out"], "tokenizer": summary["tokenizer"],
            "parameters": summary["parameters"], "export_seconds": round(export_s, 2),
            "valid_tokens_scored": count, "max_abs_logit_difference": max_diff,
            "loss": loss, "bits_per_byte": {k: v * count / math.log(2) / num_bytes for k, v in loss.items()},
            "greedy_generations_equal": f"{same}/{prompts}", "greedy_new_tokens": new_tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--out", default="bench/results/export-parity.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    import transformers

    report = {"command": " ".join(["python -m bench.export_parity", *sys.argv[1:]]), "machine": machine(),
              "transformers": transformers.__version__, "commit": git_state(), "load_before": os.getloadavg(),
              "runs": [compare(Path(r), args.prompts) for r in args.runs]}
    report["load_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
