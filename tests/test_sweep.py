"""knnformer sweep: the spec, resumable points, the summary table, the Chinchilla fit and retrieval's worth."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import yaml

from knnformer.cli import main as knnformer_main
from knnformer.experiments.scaling import Law, bootstrap, dense_equivalent, fit_law, optimal_allocation
from knnformer.experiments.sweep import expand, fit_sweep, load_spec, run_sweep

TRUE = Law(E=1.2, A=60.0, B=900.0, alpha=0.34, beta=0.28)


def write_spec(tmp_path, spec) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("spec, message", [
    ({"datastore": "x", "grid": {"tokens": [1]}, "colour": 1}, "unknown sweep spec key"),
    ({"datastore": "x", "grid": {}}, "grid is empty"),
    ({"datastore": "x"}, "grid is empty"),
    ({"datastore": "x", "grid": {"tokens": []}}, "non-empty list"),
    ({"datastore": "x", "grid": {"width": [1, 2]}}, "unknown grid key 'width'"),
    ({"datastore": "x", "grid": {"retrieval": ["maybe"]}}, "retrieval mode 'maybe'"),
    ({"datastore": "x", "grid": {"tokens": [1]}, "fit": {"bootstraps": 3}}, "unknown sweep fit key"),
    ({"grid": {"tokens": [1]}}, "names no datastore"),
])
def test_bad_specs_are_refused(tmp_path, spec, message):
    with pytest.raises(ValueError, match=message):
        load_spec(write_spec(tmp_path, spec))


def test_unknown_config_key_in_the_grid_is_named(tmp_path, byte_store):
    spec = load_spec(write_spec(tmp_path, {"datastore": str(byte_store.path), "preset": "tiny",
                                           "grid": {"model.colour": [1]}}))
    with pytest.raises(ValueError, match="model.colour"):
        run_sweep(spec, tmp_path / "out")


def test_fit_recovers_a_known_law_and_refuses_too_few_points():
    N = np.repeat(np.geomspace(1e4, 1e7, 5), 4)
    D = np.tile(np.geomspace(1e5, 1e8, 4), 5)
    law, _ = fit_law(N, D, TRUE.loss(N, D))
    for key in ("E", "A", "B", "alpha", "beta"):
        assert getattr(law, key) == pytest.approx(getattr(TRUE, key), rel=0.02), key
    with pytest.raises(ValueError, match="at least 5 points"):
        fit_law(N[:4], D[:4], TRUE.loss(N[:4], D[:4]))


def test_compute_optimal_allocation_and_dense_equivalent():
    C = 1e15
    n, d = optimal_allocation(TRUE, C)
    assert 6 * n * d == pytest.approx(C)
    best = TRUE.loss(n, d)  # any other split of the same compute does worse
    assert all(TRUE.loss(n * f, C / 6 / (n * f)) > best for f in (0.5, 0.8, 1.25, 2.0))
    assert dense_equivalent(TRUE, TRUE.loss(3e6, 1e7), 1e7) == pytest.approx(3e6, rel=1e-9)
    assert math.isinf(dense_equivalent(TRUE, TRUE.E, 1e7))  # below the law's floor at that D


def test_bootstrap_intervals_cover_the_truth_on_noisy_points():
    rng = np.random.default_rng(1)
    N = np.repeat(np.geomspace(1e4, 1e7, 4), 4)
    D = np.tile(np.geomspace(1e5, 1e8, 4), 4)
    L = TRUE.loss(N, D) * np.exp(rng.normal(0, 0.01, len(N)))
    law, _ = fit_law(N, D, L)
    laws = bootstrap(N, D, L, 40, 0, law)
    alphas = sorted(lw.alpha for lw in laws)
    assert alphas[1] <= TRUE.alpha * 1.05 and alphas[-2] >= TRUE.alpha * 0.95


def test_retrieval_is_priced_in_dense_parameters(tmp_path):
    """A retrieval point whose loss is what the law gives a 10x larger dense model is worth 10x its parameters."""
    rows = []
    for n in np.geomspace(2e4, 2e6, 4):
        for d in (1e5, 1e6, 1e7):
            rows.append({"name": f"d{n:.0f}-{d:.0f}", "values": {"n": n, "d": d, "retrieval": "off"},
                         "retrieval": "off", "N": n, "D": d,
                         "compute": 6 * n * d, "bits_per_byte": float(TRUE.loss(n, d)),
                         "filtered": {"0.125": float(TRUE.loss(n, d)) + 0.05}})
    twin = rows[1]  # the smallest dense model (N = 2e4) at D = 1e6; the retrieval model adds parameters to it
    rows.append({"name": "retro", "values": {**twin["values"], "retrieval": "on"}, "retrieval": "on", "N": 1e5,
                 "D": 1e6, "compute": 6e11,
                 "bits_per_byte": float(TRUE.loss(1e6, 1e6)), "filtered": {"0.125": float(TRUE.loss(2e5, 1e6)) + 0.05},
                 "filtered_fraction": {"0.125": 0.7}})
    spec = {"fit": {"bootstrap": 20, "budgets": [1e12]}}
    fit = fit_sweep(spec, tmp_path, rows)
    worth = fit["retrieval_worth"][0]
    assert worth["multiplier"] == pytest.approx(10, rel=0.05)
    lo, hi = worth["multiplier_interval"]
    assert lo <= worth["multiplier"] <= hi
    assert worth["alpha0.125"]["multiplier"] == pytest.approx(2, rel=0.05)
    assert worth["base_N"] == twin["N"] and worth["multiplier_vs_base"] == pytest.approx(1e6 / twin["N"], rel=0.05)
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "fit.json").read_text())["dense_points"] == 12


def test_sweep_runs_resumes_and_tabulates(tmp_path, byte_store):
    spec_path = write_spec(tmp_path, {
        "datastore": str(byte_store.path), "preset": "tiny",
        "set": ["train.eval_interval=0", "train.checkpoint_interval=4", "train.log_interval=4"],
        "grid": {"models": [{"model.dim": 16}, {"model.dim": 32}], "tokens": [1024, 2048], "seed": [1, 2]}})
    spec = load_spec(spec_path)
    points = expand(spec)
    assert len(points) == 8 and points[0]["name"] == "dim16_tokens1024_seed1"
    out = tmp_path / "out"
    assert knnformer_main(["-q", "sweep", spec_path, "--out", str(out), "--no-fit"]) == 0
    rows = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == [p["name"] for p in points]
    assert rows[0]["D"] == 1024 and rows[2]["D"] == 2048 and rows[0]["steps"] == 4  # batch 8 x context 32
    assert rows[4]["N"] > rows[0]["N"]
    table = list(csv.DictReader((out / "summary.csv").open()))
    assert len(table) == 8 and float(table[3]["bits_per_byte"]) == pytest.approx(rows[3]["bits_per_byte"])
    # a sweep killed in a point: its result is gone, its last checkpoint (step 4 of 8) is there
    killed = out / "points" / points[3]["name"]
    (killed / "result.json").unlink()
    before = rows[3]["bits_per_byte"]
    shutil.rmtree(max((killed / "run" / "checkpoints").iterdir()))
    rows2 = run_sweep(spec, out)
    assert rows2[3]["bits_per_byte"] == pytest.approx(before, rel=1e-6)  # resumed from step 4: same run
    assert [r["bits_per_byte"] for r in rows2[:3]] == [r["bits_per_byte"] for r in rows[:3]]  # skipped
    with pytest.raises(ValueError, match="at least 5 points"):  # all 8 points are dense, but fit needs >= 5:
        fit_sweep(spec, out, rows2[:4])


def test_bare_yaml_off_and_on_name_the_retrieval_modes(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("datastore: x\ngrid:\n  retrieval: [off, on]\n")  # YAML 1.1 reads these as booleans
    points = expand(load_spec(path))
    assert [p["retrieval"] for p in points] == ["off", "on"]
    assert points[1]["sets"] == ["retrieval.enabled=true"]
