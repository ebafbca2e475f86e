"""``knnformer lra listops``: generate Long Range Arena's ListOps offline, train the encoder classifier of
``experiments/lra.py`` behind a progress bar and print its test accuracy beside the majority class's."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from knnformer.cli.common import say, write_events
from knnformer.io import claim_folder


def cmd_lra(args) -> int:
    from knnformer.experiments.lra import lra_config, train_listops

    overrides = list(args.set or [])
    if args.attention:
        overrides.append(f"model.attention={args.attention}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    config = lra_config(args.preset, overrides)
    out = Path(args.out)
    _claim = claim_folder(out, "lra")  # one writer per folder; released when this returns
    out.mkdir(parents=True, exist_ok=True)
    if not args.quiet:
        d = config.data
        say(f"ListOps ({args.preset}): {d.num_train:,} / {d.num_valid:,} / {d.num_test:,} expressions of "
            f"{d.min_length + 1} to {d.max_length - 1} tokens; {config.model.attention} attention, "
            f"{config.model.num_layers} layers x {config.model.dim}, {config.train.steps} steps -> {out}")
    bar = tqdm(total=config.train.steps, unit="step", desc="training", disable=args.quiet, dynamic_ncols=True)

    def on_step(row):
        write_events(bar, row)
        if "valid_accuracy" in row:
            bar.write(f"step {row['step']:>6}: train loss {row['loss']:.4f}  "
                      f"valid accuracy {row['valid_accuracy']:.2%}")
        bar.set_postfix({"loss": f"{row['loss']:.3f}"}, refresh=False)
        bar.update(1)

    try:
        result = train_listops(config, out, on_step)
    finally:
        bar.close()
    print(f"ListOps {args.preset}, {result['attention']} attention: test accuracy {result['test_accuracy']:.2%} "
          f"(valid {result['valid_accuracy']:.2%}, majority class {result['majority_class_test_accuracy']:.2%}); "
          f"training {result['train_seconds']:.0f} s, {result['ms_per_step']:.0f} ms/step, "
          f"{result['train_tokens_per_s']:,.0f} tokens/s -> {out / ('result-' + result['attention'] + '.json')}")
    return 0


def add_lra_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser("lra", help="Long Range Arena tasks, generated offline: train and score a classifier")
    s.add_argument("task", choices=["listops"])
    s.add_argument("--preset", choices=["small", "published"], default="small",
                   help="small: minutes on one CPU thread; published: LRA's size (96k expressions up to 2000 "
                        "tokens, 6 x 512), for a GPU")
    s.add_argument("--attention", choices=["softmax", "performer"], default=None,
                   help="the blocks' attention (default: the preset's, softmax)")
    s.add_argument("--out", default="lra-listops", help="folder for the generated data and the results")
    s.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override a field of the data, model or train section")
    s.add_argument("--device", default=None, help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps "
                   "(default: the preset's train.device, auto)")
    s.set_defaults(func=cmd_lra)
    return s
