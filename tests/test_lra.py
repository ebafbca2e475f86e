"""Long Range Arena ListOps: the generator, the labels, the bidirectional classifier, a tiny training run."""

from __future__ import annotations

import json

import pytest
import torch

from knnformer.experiments.lra import (
    Classifier,
    ListOpsConfig,
    evaluate,
    generate_listops,
    listops_to_folder_,
    lra_config,
    pad_batch,
    parse,
    read_split,
    train_listops,
)


@pytest.mark.parametrize("text, value", [
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[MIN 3 [MAX 8 1 ] 5 ]", 3),
    ("[MED 1 9 4 ]", 4),
    ("[MED 1 2 3 8 ]", 2),  # even count: the mean of the middle two, rounded down
    ("[SM 7 8 [SM 5 5 ] ]", 5),
    ("[MAX [MED 2 [SM 9 9 ] 1 ] [MIN 6 [MAX 0 3 ] ] ]", 3),
])
def test_labels_of_hand_examples(text, value):
    assert evaluate(parse(text)) == value


def test_generator_is_deterministic_distinct_and_within_the_lengths(tmp_path):
    cfg = ListOpsConfig(num_train=60, num_valid=10, num_test=10, min_length=10, max_length=60, max_depth=4)
    a, b = generate_listops(cfg), generate_listops(cfg)
    assert a == b
    texts = [t for split in a.values() for t, _ in split]
    assert len(set(texts)) == 80 and all(10 < len(t.split()) < 60 for t in texts)
    assert all(evaluate(parse(t)) == y for split in a.values() for t, y in split)
    assert generate_listops(ListOpsConfig(**{**cfg.__dict__, "seed": 1})) != a
    folder = listops_to_folder_(cfg, tmp_path)
    stamp = (folder / "train.tsv").stat().st_mtime_ns
    assert listops_to_folder_(cfg, tmp_path) == folder and (folder / "train.tsv").stat().st_mtime_ns == stamp
    ids, labels = read_split(folder, "test")
    assert len(ids) == 10 and labels.tolist() == [y for _, y in a["test"]]
    assert json.loads((folder / "manifest.json").read_text())["sizes"] == {"train": 60, "valid": 10, "test": 10}


@pytest.mark.parametrize("attention", ["softmax", "performer"])
def test_classifier_is_bidirectional_and_ignores_padding(attention):
    config = lra_config("small", [f"model.attention={attention}", "data.max_length=64"])
    torch.manual_seed(0)
    model = Classifier(config.model).eval()
    ids = torch.randint(1, 16, (1, 20))
    mask = torch.ones(1, 20, dtype=torch.bool)
    changed = ids.clone()
    changed[0, -1] = 1 + changed[0, -1] % 15
    assert not torch.allclose(model.encode(ids, mask)[0, 0], model.encode(changed, mask)[0, 0])
    padded, pmask = pad_batch([ids[0], torch.randint(1, 16, (30,))])
    assert torch.allclose(model(padded, pmask)[0], model(ids, mask)[0], atol=1e-5)


def test_causal_classifier_is_refused():
    config = lra_config("small")
    config.model.causal = True
    with pytest.raises(ValueError, match="causal"):
        Classifier(config.model)


def test_tiny_training_run_beats_the_majority_class(tmp_path):
    # depth 2, short: expressions of one operator over digits and at most one nested operator
    config = lra_config("small", ["data.num_train=2000", "data.num_valid=200", "data.num_test=300",
                                  "data.min_length=4", "data.max_length=16", "data.max_depth=2", "data.max_args=4",
                                  "model.num_layers=2", "model.dim=32", "model.num_heads=2", "model.ffn_hidden=64",
                                  "train.steps=300", "train.warmup_steps=20", "train.eval_interval=0",
                                  "train.log_interval=50"])
    result = train_listops(config, tmp_path)
    assert result["test_accuracy"] > result["majority_class_test_accuracy"] + 0.1, result
    assert (tmp_path / "result-softmax.json").exists()


def test_cli_runs_listops_and_refuses_unknown_keys(tmp_path, capsys):
    from knnformer.cli import main

    tiny = ["--set", "data.num_train=40", "--set", "data.num_valid=8", "--set", "data.num_test=8",
            "--set", "data.min_length=4", "--set", "data.max_length=16", "--set", "data.max_depth=2",
            "--set", "model.dim=16", "--set", "model.num_heads=2", "--set", "train.steps=3",
            "--set", "train.eval_interval=0", "--set", "model.performer.num_features=8"]
    assert main(["-q", "lra", "listops", "--attention", "performer", "--out", str(tmp_path), *tiny]) == 0
    assert "performer attention: test accuracy" in capsys.readouterr().out
    assert json.loads((tmp_path / "result-performer.json").read_text())["config"]["model"]["causal"] is False
    assert main(["-q", "lra", "listops", "--out", str(tmp_path), "--set", "data.depth=3"]) == 2
    assert "unknown config key 'data.depth'" in capsys.readouterr().err
