"""``knnformer train DATASTORE --out RUN``: resolve the run's config (a preset and ``--set`` overrides, or the
saved config of the run to ``--resume``), then train with a progress bar that reports evaluations, Performer
redraws and index refreshes as they happen. ``knnformer demo`` trains through ``train_with_progress`` too."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from knnformer.cli.common import Interrupted, say, write_events


def resolve_train_config(args, store, run_dir: Path):
    """The config to train with: the resumed run's saved one with ``--set`` applied, or ``--config`` with
    ``--set`` and the vocabulary size taken from the datastore's tokenizer."""
    from knnformer.config import Derived, apply_overrides, config_from_dict, load_config

    if args.resume:
        record_path = run_dir / "config.json"
        if not record_path.exists():
            raise ValueError(f"{run_dir} has no run to resume (no config.json)")
        record = json.loads(record_path.read_text())
        if record["datastore"]["tokenizer_fingerprint"] != store.manifest["tokenizer"]["fingerprint"]:
            raise ValueError(f"{store.path} was built with another tokenizer than the run in {run_dir}")
        values = apply_overrides(record["config"], args.set or [], strict=True)
        if args.config:
            say("--config is ignored with --resume: the run's saved config is used (change it with --set)")
        config = config_from_dict(values)
        # a RETRO run recorded when encoder_dim 0 meant half of model.dim keeps that encoder (its weights' shape)
        config.retrieval.encoder_dim = config.retrieval.encoder_dim or Derived.of_record(record).encoder_dim
        return config
    config = load_config(args.config, args.set or [])
    if args.init_from:
        config.model = init_model_config(args, store)
    if args.retrieval_db:  # RETRO trained against retrieval databases instead of the datastore's own neighbours
        config.retrieval.enabled = True
        config.retrieval.search.databases = ",".join(str(Path(p).resolve()) for p in args.retrieval_db)
    vocab = store.tokenizer.vocab_size
    if config.model.vocab_size == 0:
        config.model.vocab_size = vocab
    elif config.model.vocab_size < vocab:
        raise ValueError(f"model.vocab_size={config.model.vocab_size} is smaller than the datastore's tokenizer "
                         f"({vocab}); leave it at 0 to take it from the datastore")
    return config


def init_model_config(args, store):
    """``--init-from RUN``: the model section of RUN's record (with any ``--set model.*``), refused if RUN's
    tokenizer is not the datastore's."""
    from knnformer.config import apply_overrides, config_from_dict
    from knnformer.run.checkpoint import latest_checkpoint, load_checkpoint

    if args.resume:
        raise ValueError("--init-from starts a new run; drop --resume")
    record = load_checkpoint(latest_checkpoint(args.init_from))["config"]
    if record["datastore"].get("tokenizer_fingerprint") != store.manifest["tokenizer"]["fingerprint"]:
        raise ValueError(f"{store.path} was built with another tokenizer than the run {args.init_from}")
    model_sets = [s for s in args.set or [] if s.strip().startswith("model.")]
    return config_from_dict(apply_overrides({"model": record["config"]["model"]}, model_sets)).model


def train_with_progress(run_dir: Path, store, config, resume: bool, quiet: bool = False,
                        init_from: str | None = None) -> object:
    """Train (or resume) the run behind a progress bar: loss, median tokens/s and MoE statistics in its postfix,
    evaluations and events above it. Raises ``Interrupted`` when training was stopped on request."""
    from knnformer.io import claim_folder
    from knnformer.train import parallel
    from knnformer.train.trainer import train

    # one writer per folder, released when this returns; under torchrun rank 0 holds it for every rank
    _claim = claim_folder(run_dir, "train") if parallel.launched().main else None
    cfg = config.train
    start = 0
    if resume:
        from knnformer.run.checkpoint import latest_checkpoint

        start = int(latest_checkpoint(run_dir).name.split("-")[1])
    bar = tqdm(total=cfg.steps, initial=start, unit="step", desc="training", disable=quiet, dynamic_ncols=True)
    rates: list[float] = []

    def on_step(row):
        rates.append(row["tokens_per_s"])
        postfix = {"loss": f"{row['loss']:.3f}", "tok/s": f"{sorted(rates[-50:])[len(rates[-50:]) // 2]:,.0f}"}
        write_events(bar, row)
        if "moe" in row:  # MoE: the weighted auxiliary loss and the mean dropped-token share over its layers
            postfix["aux"] = f"{row['aux_loss']:.4f}"
            postfix["drop"] = f"{sum(m['dropped'] for m in row['moe']) / len(row['moe']):.1%}"
        if "valid_loss" in row:
            bar.write(f"step {row['step']:>6}: train loss {row['loss']:.4f}  valid loss {row['valid_loss']:.4f}  "
                      f"valid bits/byte {row['valid_bpb']:.4f}")
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)

    try:
        result = train(run_dir, store, config, resume=resume, on_step=on_step if parallel.launched().main else None,
                       init_from=init_from)
    finally:
        bar.close()
        parallel.stop()
    if result.interrupted:
        say(f"stopped at step {result.step}; checkpoint saved. Continue with `knnformer train {store.path} "
            f"--out {run_dir} --resume`")
        raise Interrupted
    return result


def check_run_folder(run_dir: Path) -> None:
    """``--out`` must be a run folder: not a file, not a datastore (run files would be written into it)."""
    from knnformer.data.datastore import is_datastore

    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {run_dir} is a file, not a folder; pick another --out")
    if is_datastore(run_dir):
        raise ValueError(f"--out {run_dir} is a datastore (it has a datastore manifest.json); the run needs a folder "
                         "of its own: pick another --out")


def cmd_train(args) -> int:
    import sys

    from knnformer.data.datastore import Datastore
    from knnformer.train import parallel

    if getattr(args, "nproc", 0) and args.nproc > 1 and parallel.launched().size == 1:
        return parallel.launch(args.nproc, strip_nproc(args.argv or sys.argv[1:]), args.device or "auto")
    store = Datastore.open(args.datastore)
    run_dir = Path(args.out)
    check_run_folder(run_dir)
    config = resolve_train_config(args, store, run_dir)
    if args.device:
        config.train.device = args.device
    world = parallel.launched()
    quiet = args.quiet or not world.main  # one progress bar: rank 0's
    if not quiet:
        from knnformer.runtime import choose_dtype, resolve_device

        device = resolve_device(config.train.device)
        dtype, why = choose_dtype(config.train.dtype, device)
        ranks = (f", {world.size} ranks ({parallel.resolved_parallel(config.train, world)})"
                 if world.size > 1 else "")
        say(f"training {config.model.num_layers} layers x {config.model.dim} wide, context {config.model.context}, "
            f"{config.train.steps} steps of {config.train.batch_size * config.train.grad_accum} sequences "
            f"-> {run_dir}; on {device}{ranks}, {dtype} ({why})")
    result = train_with_progress(run_dir, store, config, args.resume, quiet, args.init_from)
    if not world.main:
        return 0
    print(f"trained to step {result.step}: train loss {result.last_loss:.4f}"
          + (f", valid loss {result.valid['valid_loss']:.4f} ({result.valid['valid_bpb']:.4f} bits/byte)"
             if result.valid else ""))
    return 0


def strip_nproc(argv: list[str]) -> list[str]:
    """The command line without ``--nproc N`` / ``--nproc=N`` (what each rank runs)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def add_train_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser("train", help="train a model on a datastore")
    s.add_argument("datastore")
    s.add_argument("--out", required=True, help="run folder")
    s.add_argument("--config", default=None, help="preset name (tiny, shakespeare-char, small) or YAML path")
    s.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="override a config field")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    s.add_argument("--device", default=None, help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps "
                   "(default: the config's train.device, auto)")
    s.add_argument("--nproc", type=int, default=0, metavar="N",
                   help="train with N processes on this machine (starts torchrun; train.parallel picks ddp or fsdp)")
    s.set_defaults(argv=None)
    s.add_argument("--init-from", metavar="RUN", default=None,
                   help="start a new run from RUN's decoder (its model section and weights; retrieval layers, if "
                        "enabled, start fresh): a run trained here or one made by `knnformer import-hf`")
    s.add_argument("--retrieval-db", action="extend", nargs="+", default=[], metavar="DB",
                   help="train RETRO against retrieval databases (prepared with the datastore's tokenizer and "
                        "indexed) instead of the datastore's own neighbours; sets retrieval.enabled and "
                        "retrieval.search.databases")
    s.set_defaults(func=cmd_train)
    return s
