"""Pictures of runs: ``train`` writes ``RUN/curves.png``, metrics carry a wall clock that goes on across a
resume, ``knnformer plot`` draws several runs with their refreshes, Performer redraws and MoE drop rates marked
and bars for evaluation JSONs, and TensorBoard files are optional with a clear message."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest
from conftest import make_datastore

from knnformer.cli import main
from knnformer.config import load_config
from knnformer.run.plots import draw, read_metrics
from knnformer.train.trainer import train

PNG = b"\x89PNG\r\n\x1a\n"


def train_run(run_dir: Path, store, steps: int, *overrides: str, resume: bool = False) -> Path:
    config = load_config("tiny", [f"train.steps={steps}", "train.eval_interval=5", "train.checkpoint_interval=5",
                                  "train.eval_batches=1", *overrides])
    config.model.vocab_size = 256
    train(run_dir, store, config, resume=resume)
    return run_dir


def labels(fig) -> set[str]:
    return {line.get_label() for ax in fig.axes for line in ax.get_lines()} | {ax.get_title() for ax in fig.axes}


def test_train_draws_curves_and_the_wall_clock_goes_on_across_a_resume(tmp_path):
    import matplotlib.image

    store = make_datastore(tmp_path, "bytes")
    run_dir = train_run(tmp_path / "run", store, 6)
    assert (run_dir / "curves.png").read_bytes().startswith(PNG)
    height, width, _ = matplotlib.image.imread(run_dir / "curves.png").shape
    assert width > 800 and height > 500
    first = read_metrics(run_dir)
    train_run(run_dir, store, 10, resume=True)
    rows = read_metrics(run_dir)
    walls = [r["wall_s"] for r in rows]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert all(b > a for a, b in pairwise(walls)), walls  # resumed from step 5, going on from its clock
    assert rows[4]["wall_s"] == first[4]["wall_s"]


def test_plot_marks_refreshes_redraws_and_moe_drops_and_draws_evaluation_bars(tmp_path, capsys):
    from knnformer.retrieval.build import index_datastore

    store = make_datastore(tmp_path, "bytes", num_docs=8)
    index_datastore(store.path, embedder="bytes-hash", index="flat", k=2, chunk_size=16, exclude_window=48)
    learned = train_run(tmp_path / "learned", store, 6, "retrieval.enabled=true", "retrieval.retriever.kind=learned",
                        "retrieval.refresh.schedule=0-:3", "retrieval.refresh.lag=0")
    performer = train_run(tmp_path / "performer", store, 6, "model.attention=performer",
                          "model.performer.redraw_interval=2")
    moe = train_run(tmp_path / "moe", store, 6, "model.ffn=moe", "model.moe.num_experts=4",
                    "model.moe.capacity_factor=0.5")
    assert main(["-q", "evaluate", str(learned), "--json", "--neighbour-gain", "0"]) == 0
    (tmp_path / "learned.json").write_text(capsys.readouterr().out)
    assert main(["-q", "evaluate", str(moe), "--json"]) == 0
    (tmp_path / "moe.json").write_text(capsys.readouterr().out)
    evals = [tmp_path / "learned.json", tmp_path / "moe.json"]

    fig = draw([learned, performer, moe], evals)
    seen = labels(fig)
    assert {"learned refresh", "performer Performer redraw", "moe: mean over MoE layers"} <= seen
    assert "MoE: tokens no expert took (training)" in seen
    assert "moe refresh" not in seen and "learned Performer redraw" not in seen  # marks only where a run has them
    ticks = [t.get_text() for t in fig.axes[-1].get_xticklabels()]
    assert ticks[:4] == ["learned\nretrieval on", "learned\non, alpha 0.125", "learned\nretrieval off",
                         "learned\noff, alpha 0.125"]
    assert ticks[4:] == ["moe", "moe\nplain, alpha 0.125"]
    heights = [bar.get_height() for bar in fig.axes[-1].patches]
    result = json.loads((tmp_path / "learned.json").read_text())
    assert heights[0] == result["bits_per_byte"] and heights[2] == result["retrieval_off"]["bits_per_byte"]
    assert heights[1] == result["filtered"]["0.125"]["bits_per_byte"]

    out = tmp_path / "all.png"
    argv = ["-q", "plot", str(learned), str(performer), str(moe), "--eval", str(evals[0]), "--eval", str(evals[1]),
            "--out", str(out)]
    assert main(argv) == 0 and out.read_bytes().startswith(PNG)


def test_bad_plot_inputs_give_one_line_errors(tmp_path, capsys):
    def error(*argv) -> str:
        assert main(["-q", *map(str, argv)]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("knnformer: error: ") and err.count("\n") == 1, err
        return err

    assert "has no metrics.jsonl" in error("plot", tmp_path, "--out", tmp_path / "a.png")
    assert "must be a .png file" in error("plot", tmp_path, "--out", tmp_path / "a.jpg")
    (tmp_path / "x.json").write_text(json.dumps({"loss": 1.0}))
    assert "is not an evaluation JSON" in error("plot", "--eval", tmp_path / "x.json", "--out", tmp_path / "a.png")
    assert "at least one run" in error("plot", "--out", tmp_path / "a.png")
    assert not (tmp_path / "a.png").exists()


def test_tensorboard_files_or_a_clear_message(tmp_path):
    store = make_datastore(tmp_path, "bytes")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="the tensorboard package is not installed: pip install tensorboard"):
            train_run(tmp_path / "run", store, 2, "train.tensorboard=true")
        return
    run_dir = train_run(tmp_path / "run", store, 6, "train.tensorboard=true")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 7))
    assert [e.step for e in events.Scalars("valid/valid_bpb")] == [5, 6]


def test_a_run_logged_before_wall_s_gets_a_clock_estimated_from_its_throughput(tmp_path):
    from knnformer.run.plots import wall_clock

    store = make_datastore(tmp_path, "bytes")
    run_dir = train_run(tmp_path / "run", store, 6)
    rows = [{k: v for k, v in r.items() if k != "wall_s"} for r in read_metrics(run_dir)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seconds, estimated = wall_clock(run_dir, rows)
    tokens_per_step = 8 * 32  # the tiny preset's batch x context
    assert estimated and seconds[0] == pytest.approx(tokens_per_step / rows[0]["tokens_per_s"])
    assert all(b > a for a, b in pairwise(seconds))
    fig = draw([run_dir])
    assert fig.axes[1].get_xlabel() == "wall-clock (s), estimated from tokens/s"
