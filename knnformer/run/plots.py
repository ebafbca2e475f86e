"""Pictures of runs: train and valid loss and bits per byte against steps and against wall-clock time, for one
or several runs, with the events a run has marked on its curves (index refreshes as dashed vertical lines,
Performer redraws as ticks along the bottom, MoE dropped-token shares in a panel of their own), and bars for
evaluation JSONs (``knnformer evaluate --json``): bits per byte with retrieval on and off, and beside them the
overlap-filtered figures at alpha 0.125.

It reads only what a run writes (``RUN/metrics.jsonl``, ``RUN/config.json``) and evaluation JSONs, so it lives in
``run``: ``train`` draws ``RUN/curves.png`` at the end of training with it and the CLI's ``plot`` draws any runs.
matplotlib runs headless (the Agg backend); nothing is shown on screen.

Wall-clock time is the ``wall_s`` of each metrics line (seconds of training, evaluation and refreshes since the
run began, across resumes). Runs written before that field existed get a time estimated from their throughput
(``tokens_per_s`` and the tokens per step of ``config.json``): training time alone, labelled as an estimate.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from knnformer.io import writing_file

logger = logging.getLogger(__name__)

ALPHA = "0.125"  # RETRO's overlap filter shown beside every retrieval figure


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The metrics lines of a run folder (or of a ``metrics.jsonl`` path), in step order; a torn last line (a
    crash while writing) is skipped."""
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"{run} has no metrics.jsonl (not a run folder, or a run that has not logged a step yet)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    if not rows:
        raise ValueError(f"{path} holds no metrics yet")
    return sorted(rows, key=lambda r: r["step"])


def wall_clock(run: Path, rows: list[dict[str, Any]]) -> tuple[list[float] | None, bool]:
    """Seconds since the run began at each row, and whether they are estimated from the throughput. None when
    neither ``wall_s`` nor the run's tokens per step is known."""
    if all("wall_s" in r for r in rows):
        return [r["wall_s"] for r in rows], False
    try:
        config = json.loads((run / "config.json").read_text())["config"]
        train, context = config["train"], config["model"]["context"]
    except (OSError, KeyError, json.JSONDecodeError):
        return None, True
    tokens_per_step = train["batch_size"] * train.get("grad_accum", 1) * context
    seconds, total, previous = [], 0.0, 0
    for row in rows:  # each logged rate stands for the unlogged steps before it
        total += (row["step"] - previous) * tokens_per_step / max(row.get("tokens_per_s") or 1e-9, 1e-9)
        previous = row["step"]
        seconds.append(total)
    return seconds, True


def read_evaluation(path: str | Path) -> dict[str, Any]:
    """An evaluation JSON (``knnformer evaluate --json``), refused with a one-line error if it is not one."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable evaluation JSON ({e})") from None
    if not isinstance(result, dict) or "bits_per_byte" not in result:
        raise ValueError(f"{path} is not an evaluation JSON (no bits_per_byte); write one with "
                         f"`knnformer evaluate RUN --json > FILE`")
    return result


def evaluation_bars(name: str, result: dict[str, Any]) -> list[tuple[str, float]]:
    """(label, bits per byte) of one evaluation: retrieval on and off, and each at alpha 0.125."""
    bars = []
    on = result.get("retrieval", "off") == "on"
    bars.append((f"{name}\nretrieval on" if on else name, result["bits_per_byte"]))
    filtered = (result.get("filtered") or {}).get(ALPHA)
    if filtered and filtered.get("bits_per_byte") is not None:
        bars.append((f"{name}\n{'on' if on else 'plain'}, alpha {ALPHA}", filtered["bits_per_byte"]))
    off = result.get("retrieval_off")
    if off:
        bars.append((f"{name}\nretrieval off", off["bits_per_byte"]))
        filtered = (off.get("filtered") or {}).get(ALPHA)
        if filtered and filtered.get("bits_per_byte") is not None:
            bars.append((f"{name}\noff, alpha {ALPHA}", filtered["bits_per_byte"]))
    return bars


def plot_runs(runs: list[str | Path], out: str | Path, evaluations: list[str | Path] = (),
              names: list[str] | None = None) -> Path:
    """Draw ``runs`` (and the bars of ``evaluations``) into the PNG ``out``, written atomically."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {out}")
    fig = draw(runs, evaluations, names)
    with writing_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


def draw(runs: list[str | Path], evaluations: list[str | Path] = (), names: list[str] | None = None):
    """The matplotlib figure of ``plot_runs``: a row of loss and a row of valid bits per byte (against steps, and
    against wall-clock time), a row of MoE dropped shares if a run has MoE, a row of evaluation bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs and not evaluations:
        raise ValueError("give at least one run folder or evaluation JSON")
    runs = [Path(r) for r in runs]
    names = names or [r.name if r.is_dir() else r.parent.name for r in runs]
    data = [(name, run, read_metrics(run)) for name, run in zip(names, runs)]
    evals = [(Path(p).stem, read_evaluation(p)) for p in evaluations]
    moe = any("moe" in r for _, _, rows in data for r in rows)
    nrows = (2 if data else 0) + (1 if moe else 0) + (1 if evals else 0)
    height = 3.6 * nrows
    fig = plt.figure(figsize=(12, height))  # fixed margins: a layout engine costs ~1 s per picture on this CPU
    grid = fig.add_gridspec(nrows, 2, left=0.06, right=0.98, top=1 - 0.4 / height, bottom=0.85 / height,
                            hspace=0.55, wspace=0.16)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    row = 0
    if data:
        axes = [[fig.add_subplot(grid[row + i, j]) for j in range(2)] for i in range(2)]
        estimated = False
        for k, (name, run, rows) in enumerate(data):
            colour = colours[k % len(colours)]
            seconds, guessed = wall_clock(run if run.is_dir() else run.parent, rows)
            estimated |= guessed and seconds is not None
            for j, xs in enumerate(([r["step"] for r in rows], seconds)):
                if xs is None:
                    continue
                _curves(axes[0][j], axes[1][j], rows, xs, name, colour)
        for j, unit in enumerate(("step", "wall-clock (s)" + (", estimated from tokens/s" if estimated else ""))):
            axes[0][j].set(xlabel=unit, ylabel="loss (nats / token)")
            axes[1][j].set(xlabel=unit, ylabel="valid bits / byte")
            for ax in (axes[0][j], axes[1][j]):
                ax.grid(alpha=0.3)
                if any(not line.get_label().startswith("_") for line in ax.lines):
                    ax.legend(fontsize=7)
            if not any("valid_bpb" in r for _, _, rows in data for r in rows):
                axes[1][j].text(0.5, 0.5, "no valid evaluation (train.eval_interval)", ha="center",
                                transform=axes[1][j].transAxes)
        axes[0][0].set_title("loss against steps")
        axes[0][1].set_title("loss against wall-clock time")
        row += 2
    if moe:
        ax = fig.add_subplot(grid[row, :])
        for k, (name, _, rows) in enumerate(data):
            points = [(r["step"], sum(m["dropped"] for m in r["moe"]) / len(r["moe"])) for r in rows if r.get("moe")]
            if points:
                ax.plot(*zip(*points), color=colours[k % len(colours)], label=f"{name}: mean over MoE layers")
        ax.set(xlabel="step", ylabel="dropped-token share", title="MoE: tokens no expert took (training)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        row += 1
    if evals:
        ax = fig.add_subplot(grid[row, :])
        bars = [bar for name, result in evals for bar in evaluation_bars(name, result)]
        labels, values = zip(*bars)
        drawn = ax.bar(range(len(bars)), values, color=[_bar_colour(label, colours) for label in labels])
        ax.bar_label(drawn, fmt="%.4f", fontsize=7)
        ax.set_xticks(range(len(bars)), labels, fontsize=7)
        ax.set(title=f"evaluation (alpha {ALPHA}: chunks whose overlap with their neighbours "
                                           f"is at most {ALPHA} of the chunk)")
        low, high = min(values), max(values)
        ax.set_ylim(low - 0.3 * (high - low) - 0.02 * high, high + 0.15 * (high - low) + 0.02 * high)
        ax.set_ylabel("bits / byte (axis not from 0)")
        ax.grid(alpha=0.3, axis="y")
    return fig


def _curves(loss_ax, bpb_ax, rows: list[dict[str, Any]], xs: list[float], name: str, colour: str) -> None:
    """One run's curves on a loss axis and a bits-per-byte axis, against ``xs`` (steps or seconds), with its
    refreshes as dashed lines and its Performer redraws as ticks."""
    loss_ax.plot(xs, [r["loss"] for r in rows], color=colour, alpha=0.45, linewidth=1, label=f"{name} train")
    valid = [(x, r) for x, r in zip(xs, rows) if "valid_loss" in r]
    if valid:
        vx = [x for x, _ in valid]
        loss_ax.plot(vx, [r["valid_loss"] for _, r in valid], color=colour, marker="o", markersize=3,
                     label=f"{name} valid")
        bpb_ax.plot(vx, [r["valid_bpb"] for _, r in valid], color=colour, marker="o", markersize=3,
                    label=f"{name} valid")
    refreshes = [x for x, r in zip(xs, rows) if "refresh" in r]
    for i, x in enumerate(refreshes):
        for ax in (loss_ax, bpb_ax):
            ax.axvline(x, color=colour, linestyle="--", linewidth=0.8, alpha=0.6,
                       label=f"{name} refresh" if i == 0 and ax is loss_ax else None)
    redraws = [x for x, r in zip(xs, rows) if r.get("redraw")]
    if redraws:
        loss_ax.plot(redraws, [0.02] * len(redraws), "|", color=colour, markersize=10,
                     transform=loss_ax.get_xaxis_transform(), label=f"{name} Performer redraw")


def _bar_colour(label: str, colours: list[str]) -> str:
    if "alpha" in label:
        return colours[2] if "off" in label else colours[3]
    return colours[1] if "off" in label else colours[0]


def write_curves(run_dir: str | Path) -> Path | None:
    """``RUN/curves.png`` at the end of training; a failure is logged and never fails the run (its checkpoint is
    already written)."""
    try:
        return plot_runs([run_dir], Path(run_dir) / "curves.png")
    except ImportError:
        logger.warning("matplotlib is not installed: no curves.png (pip install matplotlib)")
    except Exception as e:  # noqa: BLE001 - a picture must not fail a finished run
        logger.warning("could not draw %s/curves.png: %s", run_dir, e)
    return None
