"""``knnformer sweep SPEC.yaml --out DIR``: train every point of a scaling-law grid (resumable), write the
summary table, fit Chinchilla's law with bootstrap intervals, plot loss against compute and price retrieval in
dense parameters (``experiments/sweep.py``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from knnformer.cli.common import say


def cmd_sweep(args) -> int:
    from knnformer.experiments.sweep import expand, fit_sweep, load_spec, run_sweep

    spec = load_spec(args.spec)
    points = expand(spec)
    out = Path(args.out)
    done = sum((out / "points" / p["name"] / "result.json").exists() for p in points)
    if not args.quiet:
        say(f"sweep {args.spec}: {len(points)} points ({done} done) -> {out}")
    bar = tqdm(total=len(points), initial=done if (args.parallel or spec.get("parallel", 1)) == 1 else 0,
               unit="point", desc="sweep", disable=args.quiet, dynamic_ncols=True)
    seen = set()

    def progress(row):
        if row["name"] not in seen:
            seen.add(row["name"])
            bar.set_postfix({"last": f"{row['bits_per_byte']:.3f} bpb"}, refresh=False)
            bar.n = len(seen) if (args.parallel or spec.get("parallel", 1)) > 1 else max(bar.n, done + len(seen))
            bar.refresh()

    try:
        rows = run_sweep(spec, out, args.parallel, args.threads, progress)
    finally:
        bar.close()
    if args.no_fit:
        print(f"{len(rows)} points -> {out / 'summary.csv'}")
        return 0
    fit = fit_sweep(spec, out, rows)
    law = fit["law"]
    ci = fit["intervals"]
    print(f"{fit['dense_points']} dense points: L(N, D) = {law['E']:.4g} + {law['A']:.4g} / N^{law['alpha']:.3f} "
          f"+ {law['B']:.4g} / D^{law['beta']:.3f} ({fit['target']}); alpha 95% [{ci['alpha'][0]:.3f}, "
          f"{ci['alpha'][1]:.3f}], beta [{ci['beta'][0]:.3f}, {ci['beta'][1]:.3f}]")
    for c in fit["compute_optimal"]:
        print(f"  compute {c['compute']:.3g}: N_opt {c['N']:.3g} [{c['N_interval'][0]:.3g}, {c['N_interval'][1]:.3g}],"
              f" D_opt {c['D']:.3g} [{c['D_interval'][0]:.3g}, {c['D_interval'][1]:.3g}]")
    for r in fit["retrieval_worth"]:
        lo, hi = r["multiplier_interval"] or (float("nan"), float("nan"))
        line = f"  {r['name']}: worth {r['multiplier']:.3g}x its parameters [{lo:.3g}, {hi:.3g}]"
        if "multiplier_vs_base" in r:
            blo, bhi = r["multiplier_vs_base_interval"] or (float("nan"), float("nan"))
            line += f", {r['multiplier_vs_base']:.3g}x its dense twin's [{blo:.3g}, {bhi:.3g}]"
        key = next((k for k in r if k.startswith("alpha")), None)
        if key:
            a = r[key]
            alo, ahi = a["multiplier_interval"] or (float("nan"), float("nan"))
            line += f"; at {key} {a['multiplier']:.3g}x [{alo:.3g}, {ahi:.3g}]"
        print(line)
    print(f"-> {out / 'summary.csv'}, {out / 'fit.json'}, {out / 'frontier.png'}")
    if args.json:
        print(json.dumps(fit))
    return 0


def add_sweep_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser("sweep", help="a scaling-law sweep: train a grid of runs, fit L(N, D), price retrieval")
    s.add_argument("spec", help="the sweep's YAML spec (see knnformer/experiments/sweep.py)")
    s.add_argument("--out", required=True, help="folder of the points, the summary table, the fit and the plot")
    s.add_argument("--parallel", type=int, default=None, help="points trained at once (default: the spec's, 1)")
    s.add_argument("--threads", type=int, default=None, help="thread budget shared by those (default: the spec's, 1)")
    s.add_argument("--no-fit", action="store_true", help="train and tabulate only")
    s.add_argument("--json", action="store_true", help="also print the fit as JSON")
    s.set_defaults(func=cmd_sweep)
