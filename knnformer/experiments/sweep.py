"""Scaling-law sweeps: ``knnformer sweep SPEC.yaml --out DIR``.

The spec is data (YAML):

    datastore: path/to/datastore        # relative to the spec file; a grid key "datastore" may list several
    preset: tiny                        # optional: a config preset under the points
    set: [train.batch_size=16, ...]     # optional: overrides for every point
    grid:                               # the cartesian product of these lists, in this order
      models: [{model.dim: 32, model.num_layers: 2}, ...]   # bundles of overrides (width and depth together)
      tokens: [200000, 400000]          # training tokens: train.steps = ceil(tokens / tokens per step)
      retrieval: [off, on]              # a name of retrieval_modes
      seed: [1337]                      # train.seed
      model.num_heads: [2]              # any other config key: that key's values
    retrieval_modes: {on: [retrieval.enabled=true]}   # optional; off and on are built in
    parallel: 1                         # points trained at once (each its own process)
    threads: 2                          # the thread budget shared by the points running at once
    fit: {bootstrap: 200, seed: 0, alpha: 0.125, budgets: [1e13, 1e14], target: bits_per_byte}

Every point is an ordinary run in ``DIR/points/NAME/`` (checkpointed; a killed sweep resumes a point from its
last checkpoint and skips finished ones), evaluated on the whole valid split (with retrieval on, off and
RETRO's overlap-filtered figures). ``DIR/summary.jsonl`` and ``DIR/summary.csv`` hold one row per point.
Then the fit (scaling.py) on the dense points: the law with bootstrap intervals, the compute-optimal N and D
for the budgets, the plot ``DIR/frontier.png``, and for each retrieval point the dense-equivalent parameter
multiplier, on the whole split and on the chunks whose overlap with their neighbours is at most ``fit.alpha``
(dense law refitted on the dense points' figures over those same chunks); all in ``DIR/fit.json``.
N is the parameter count without the token embedding (Kaplan et al.'s convention; the head is tied to it),
D the training tokens, compute 6 N D.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import logging
import math
import re
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml

from knnformer.config import apply_overrides, config_from_dict, resolve_preset
from knnformer.io import atomic_write_text
from knnformer.run.checkpoint import list_checkpoints

logger = logging.getLogger(__name__)

SPEC_KEYS = {"datastore", "preset", "set", "grid", "retrieval_modes", "parallel", "threads", "fit"}
FIT_KEYS = {"bootstrap", "seed", "alpha", "budgets", "target"}
SPECIAL_GRID_KEYS = {"models", "tokens", "retrieval", "seed", "datastore"}
BUILTIN_MODES = {"off": ["retrieval.enabled=false"], "on": ["retrieval.enabled=true"]}


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read and check a sweep spec: unknown keys, an empty grid and malformed values are refused by name."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read the sweep spec {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"sweep spec {path} is not valid YAML: {e}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"sweep spec {path} must be a mapping with a grid")  # noqa: TRY004 (the CLI's error type)
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ValueError(f"unknown sweep spec key(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(SPEC_KEYS))})")
    grid = spec.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ValueError("the sweep spec's grid is empty: give it at least one key with a list of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid key {key!r} must have a non-empty list of values, got {values!r}")
        if key not in SPECIAL_GRID_KEYS and "." not in key:
            raise ValueError(f"unknown grid key {key!r}: use a config key such as model.dim, or one of "
                             f"{', '.join(sorted(SPECIAL_GRID_KEYS))}")
        if key == "models" and not all(isinstance(v, dict) and v for v in values):
            raise ValueError("grid key 'models' lists mappings of config keys, "
                             "e.g. {model.dim: 64, model.num_layers: 2}")
    if "retrieval" in grid:  # YAML 1.1 reads a bare off / on as false / true
        grid["retrieval"] = [{True: "on", False: "off"}.get(m, m) if isinstance(m, bool) else m
                             for m in grid["retrieval"]]
    modes = {**BUILTIN_MODES, **(spec.get("retrieval_modes") or {})}
    for mode in grid.get("retrieval", []):
        if str(mode) not in modes:
            raise ValueError(f"retrieval mode {mode!r} is neither off, on nor a key of retrieval_modes")
    fit = spec.get("fit") or {}
    if not isinstance(fit, dict) or set(fit) - FIT_KEYS:
        raise ValueError(f"unknown sweep fit key(s) {', '.join(sorted(set(fit) - FIT_KEYS))} "
                         f"(known: {', '.join(sorted(FIT_KEYS))})")
    if fit.get("target", "bits_per_byte") not in ("bits_per_byte", "loss"):
        raise ValueError("fit.target must be bits_per_byte or loss")
    for key in ("parallel", "threads"):
        if key in spec and (not isinstance(spec[key], int) or spec[key] < 1):
            raise ValueError(f"sweep spec {key} must be a positive integer, got {spec[key]!r}")
    if "datastore" not in spec and "datastore" not in grid:
        raise ValueError("the sweep spec names no datastore (a top-level datastore, or a grid key datastore)")
    spec = copy.deepcopy(spec)
    spec["retrieval_modes"] = {str(k): list(v) for k, v in modes.items()}
    spec["_dir"] = str(path.resolve().parent)
    return spec


def _slug(key: str, value: Any) -> str:
    if isinstance(value, dict):
        text = "-".join(f"{k.split('.')[-1]}{v}" for k, v in value.items())
    else:
        text = f"{key.split('.')[-1]}{Path(str(value)).name if key == 'datastore' else value}"
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text)


def expand(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid's points in order: each with its name, its grid values and its config overrides."""
    grid = spec["grid"]
    keys = list(grid)
    points = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        sets = list(spec.get("set") or [])
        for key, value in values.items():
            if key == "models":
                sets += [f"{k}={v}" for k, v in value.items()]
            elif key == "retrieval":
                sets += spec["retrieval_modes"][str(value)]
            elif key == "seed":
                sets.append(f"train.seed={value}")
            elif key not in ("tokens", "datastore"):
                sets.append(f"{key}={value}")
        name = "_".join(_slug(k, v) for k, v in values.items())
        datastore = Path(spec["_dir"]) / str(values.get("datastore", spec.get("datastore")))
        points.append({"name": name, "values": values, "sets": sets, "datastore": str(datastore),
                       "retrieval": str(values.get("retrieval", "off")), "tokens": values.get("tokens")})
    names = [p["name"] for p in points]
    if len(set(names)) != len(names):
        raise ValueError("the grid has repeated values: two points would share a folder")
    return points


def point_config(spec: dict[str, Any], point: dict[str, Any], vocab_size: int, threads: int):
    values: dict[str, Any] = {}
    if spec.get("preset"):
        values = yaml.safe_load(resolve_preset(spec["preset"]).read_text()) or {}
    apply_overrides(values, point["sets"])
    values.setdefault("model", {})["vocab_size"] = vocab_size
    values.setdefault("train", {})["threads"] = threads
    config = config_from_dict(values)
    if point["tokens"] is not None:
        per_step = config.train.batch_size * config.train.grad_accum * config.model.context
        config.train.steps = max(1, math.ceil(float(point["tokens"]) / per_step))
        config.train.checkpoint_interval = min(config.train.checkpoint_interval, config.train.steps)
        config.validate()
    return config


def run_point(spec: dict[str, Any], point: dict[str, Any], out: str, threads: int) -> dict[str, Any]:
    """Train (or resume) and evaluate one point; its result.json marks it done. Runs in a worker process."""
    import time

    import torch

    from knnformer.data.datastore import Datastore
    from knnformer.eval.evaluate import evaluate_run
    from knnformer.run.record import load_run
    from knnformer.train.trainer import train

    folder = Path(out) / "points" / point["name"]
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    torch.set_num_threads(threads)
    store = Datastore.open(point["datastore"])
    config = point_config(spec, point, store.tokenizer.vocab_size, threads)
    folder.mkdir(parents=True, exist_ok=True)
    saved = folder / "point.json"
    identity = {"values": point["values"], "sets": point["sets"], "datastore": point["datastore"],
                "steps": config.train.steps}
    if saved.exists() and json.loads(saved.read_text()) != json.loads(json.dumps(identity)):
        raise ValueError(f"{folder} holds a point trained from another spec; remove it or pick another --out")
    atomic_write_text(saved, json.dumps(identity, indent=2))
    run_dir = folder / "run"
    t0 = time.perf_counter()
    train(run_dir, store, config, resume=bool(list_checkpoints(run_dir)))
    train_s = time.perf_counter() - t0
    evaluated = evaluate_run(run_dir, "valid", gain_windows=0)
    model = load_run(run_dir)[0]
    total = sum(p.numel() for p in model.parameters())
    embed = sum(p.numel() for n, p in model.named_parameters() if n.startswith("embed."))
    tokens = config.train.steps * config.train.batch_size * config.train.grad_accum * config.model.context
    row = {"name": point["name"], "values": point["values"], "datastore": point["datastore"],
           "retrieval": point["retrieval"], "N": total - embed, "N_total": total, "D": tokens,
           "compute": 6.0 * (total - embed) * tokens, "steps": config.train.steps,
           "loss": evaluated["loss"], "bits_per_byte": evaluated["bits_per_byte"],
           "filtered": {a: f["bits_per_byte"] for a, f in (evaluated.get("filtered") or {}).items()},
           "filtered_fraction": {a: f["fraction"] for a, f in (evaluated.get("filtered") or {}).items()},
           "train_seconds": round(train_s, 1)}
    if "retrieval_off" in evaluated:
        off = evaluated["retrieval_off"]
        row["retrieval_off"] = {"loss": off["loss"], "bits_per_byte": off["bits_per_byte"],
                                "filtered": {a: f["bits_per_byte"] for a, f in (off.get("filtered") or {}).items()}}
    atomic_write_text(done, json.dumps(row, indent=2))
    return row


def write_summary(out: Path, rows: list[dict[str, Any]]) -> None:
    """``summary.jsonl`` (whole rows) and ``summary.csv`` (flat columns), rewritten atomically."""
    atomic_write_text(out / "summary.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    alphas = sorted({a for r in rows for a in r.get("filtered", {})}, key=float)
    grid_keys = list(dict.fromkeys(k for r in rows for k in r["values"]))
    cols = ["name", *grid_keys, "retrieval", "N", "N_total", "D", "compute", "steps", "loss", "bits_per_byte",
            *[f"bpb_alpha{a}" for a in alphas], "retrieval_off_bpb", "train_seconds"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        vals = {**{k: json.dumps(v) if isinstance(v, dict) else v for k, v in r["values"].items()}, **r}
        vals.update({f"bpb_alpha{a}": r.get("filtered", {}).get(a) for a in alphas})
        vals["retrieval_off_bpb"] = (r.get("retrieval_off") or {}).get("bits_per_byte")
        w.writerow([vals.get(c) for c in cols])
    atomic_write_text(out / "summary.csv", buf.getvalue())


def run_sweep(spec: dict[str, Any], out: str | Path, parallel: int | None = None, threads: int | None = None,
              progress=None) -> list[dict[str, Any]]:
    """Run every point not yet done (``parallel`` at a time, sharing ``threads``), in grid order; returns the rows
    of all points. ``progress(row)`` is called as each finishes."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points = expand(spec)
    parallel = parallel or spec.get("parallel", 1)
    threads = threads or spec.get("threads", 1)
    per_point = max(1, threads // parallel)
    clean = {k: v for k, v in spec.items() if k != "_dir"}
    atomic_write_text(out / "spec.json", json.dumps(clean, indent=2))
    rows: dict[str, dict] = {}
    if parallel == 1:
        for point in points:
            rows[point["name"]] = run_point(spec, point, str(out), per_point)
            write_summary(out, [rows[p["name"]] for p in points if p["name"] in rows])
            if progress:
                progress(rows[point["name"]])
    else:
        with ProcessPoolExecutor(parallel, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_point, spec, p, str(out), per_point): p["name"] for p in points}
            for future, name in futures.items():  # in grid order; the pool runs them `parallel` at a time
                rows[name] = future.result()
                write_summary(out, [rows[p["name"]] for p in points if p["name"] in rows])
                if progress:
                    progress(rows[name])
    return [rows[p["name"]] for p in points]


def _law_summary(law, laws) -> dict[str, Any]:
    from knnformer.experiments.scaling import interval

    return {"law": law.as_dict(), "intervals": {k: interval([getattr(lw, k) for lw in laws])
                                                for k in ("E", "A", "B", "alpha", "beta")}}


def fit_sweep(spec: dict[str, Any], out: str | Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Fit the law to the dense points and price each retrieval point in dense parameters; writes fit.json and
    frontier.png. Refuses a fit with fewer dense points than the law's parameters."""
    from knnformer.experiments.scaling import (
        bootstrap,
        dense_equivalent,
        fit_law,
        interval,
        optimal_allocation,
        plot_frontier,
    )

    out = Path(out)
    fit = spec.get("fit") or {}
    target = fit.get("target", "bits_per_byte")
    alpha = str(float(fit.get("alpha", 0.125)))
    samples, seed = int(fit.get("bootstrap", 200)), int(fit.get("seed", 0))
    budgets = [float(b) for b in fit.get("budgets", [])]
    dense = [r for r in rows if r["retrieval"] == "off"]
    retrieval = [r for r in rows if r["retrieval"] != "off"]
    N, D = [r["N"] for r in dense], [r["D"] for r in dense]
    law, residual = fit_law(N, D, [r[target] for r in dense])
    laws = bootstrap(N, D, [r[target] for r in dense], samples, seed, law)
    result: dict[str, Any] = {"target": target, "points": len(rows), "dense_points": len(dense),
                              "bootstrap": samples, "huber_objective": residual, **_law_summary(law, laws)}
    result["range"] = {"N": [min(N), max(N)], "D": [min(D), max(D)]}
    result["compute_optimal"] = []
    for c in budgets:
        n, d = optimal_allocation(law, c)
        boot = [optimal_allocation(lw, c) for lw in laws]
        result["compute_optimal"].append({"compute": c, "N": n, "D": d, "N_interval": interval([b[0] for b in boot]),
                                          "D_interval": interval([b[1] for b in boot]),
                                          "loss": float(law.loss(n, d))})
    # the dense law over the chunks whose overlap with their neighbours is at most alpha (bits per byte only)
    filtered_dense = [r for r in dense if alpha in r.get("filtered", {}) and not math.isnan(r["filtered"][alpha])]
    law_a, laws_a = None, []
    if target == "bits_per_byte" and len(filtered_dense) >= 5 and retrieval:
        fN, fD = [r["N"] for r in filtered_dense], [r["D"] for r in filtered_dense]
        fL = [r["filtered"][alpha] for r in filtered_dense]
        law_a = fit_law(fN, fD, fL)[0]
        laws_a = bootstrap(fN, fD, fL, samples, seed, law_a)
        result[f"alpha{alpha}"] = _law_summary(law_a, laws_a)
    result["retrieval_worth"] = []

    def base_key(row):  # the point's grid values but for retrieval: its dense twin has the same key
        return json.dumps({k: v for k, v in row["values"].items() if k != "retrieval"}, sort_keys=True)

    twins = {base_key(r): r for r in dense}
    for r in retrieval:
        entry = {"name": r["name"], "retrieval": r["retrieval"], "N": r["N"], "D": r["D"], target: r[target]}
        n_eq = dense_equivalent(law, r[target], r["D"])
        eqs = [dense_equivalent(lw, r[target], r["D"]) for lw in laws]
        entry.update({"dense_equivalent_N": n_eq, "multiplier": n_eq / r["N"],
                      "multiplier_interval": interval([e / r["N"] for e in eqs]),
                      "beyond_law_share": sum(math.isinf(e) for e in eqs) / len(eqs),
                      "extrapolated": bool(n_eq > max(N))})  # past the largest dense N the law was fitted on
        twin = twins.get(base_key(r))
        if twin is not None:  # over the same model without its retrieval parameters (RETRO's comparison)
            entry.update({"base_N": twin["N"], "base_" + target: twin[target],
                          "multiplier_vs_base": n_eq / twin["N"],
                          "multiplier_vs_base_interval": interval([e / twin["N"] for e in eqs])})
        if law_a is not None and alpha in r.get("filtered", {}):
            loss_a = r["filtered"][alpha]
            n_a = dense_equivalent(law_a, loss_a, r["D"])
            boot_a = [dense_equivalent(lw, loss_a, r["D"]) / r["N"] for lw in laws_a]
            entry[f"alpha{alpha}"] = {"bits_per_byte": loss_a, "multiplier": n_a / r["N"],
                                      "multiplier_interval": interval(boot_a),
                                      "kept_fraction": r.get("filtered_fraction", {}).get(alpha)}
        result["retrieval_worth"].append(entry)
    plotted = [{"compute": r["compute"], "loss": r[target], "N": r["N"], "retrieval": r["retrieval"]} for r in rows]
    plot_frontier(plotted, law, laws, out / "frontier.png", f"valid {target.replace('_', ' ')}",
                  f"{len(dense)} dense + {len(retrieval)} retrieval points; "
                  f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3g} + {law.B:.3g}/D^{law.beta:.3g} ({target})",
                  budgets)
    atomic_write_text(out / "fit.json", json.dumps(_finite(result), indent=2))
    return result


def _finite(value):
    """JSON without Infinity: inf becomes the string "inf" (beyond the law), nan None."""
    if isinstance(value, float):
        return "inf" if math.isinf(value) else (None if math.isnan(value) else value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
