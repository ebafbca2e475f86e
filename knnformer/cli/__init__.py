"""The ``knnformer`` command: prepare, index, inspect, train, evaluate, generate, lra, sweep and demo.

Each subcommand lives in its own module here, with its ``cmd_X`` and the ``add_X_parser(sub)`` that wires it
in; this module builds the parser, sets up logging and turns errors into one line and an exit status. The CLI
owns what the user sees (progress bars, tables, one-line errors); the library modules log.
"""

from __future__ import annotations

import argparse
import logging
import sys

from knnformer.cli.common import Interrupted, say
from knnformer.cli.demo import add_demo_parser
from knnformer.cli.evaluate import add_evaluate_parser
from knnformer.cli.export import add_export_parser
from knnformer.cli.generate import add_generate_parser
from knnformer.cli.import_hf import add_import_hf_parser
from knnformer.cli.index import add_index_parser
from knnformer.cli.inspect import add_inspect_parser
from knnformer.cli.lra import add_lra_parser
from knnformer.cli.plot import add_plot_parser
from knnformer.cli.prepare import add_prepare_parser
from knnformer.cli.serve import add_serve_parser
from knnformer.cli.sweep import add_sweep_parser
from knnformer.cli.train import add_train_parser
from knnformer.cli.verify import add_verify_parser

logger = logging.getLogger("knnformer")

SUBCOMMANDS = (add_prepare_parser, add_index_parser, add_inspect_parser, add_train_parser, add_evaluate_parser,
               add_generate_parser, add_lra_parser, add_demo_parser)  # in the order --help lists them
SUBCOMMANDS += (add_plot_parser, add_export_parser, add_import_hf_parser)
SUBCOMMANDS += (add_verify_parser,)
SUBCOMMANDS += (add_serve_parser,)
SUBCOMMANDS += (add_sweep_parser,)


def build_parser() -> argparse.ArgumentParser:
    from knnformer import __version__

    p = argparse.ArgumentParser(prog="knnformer", description="Language models that read their own corpus.")
    p.add_argument("--version", action="version", version=f"knnformer {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)
    for add_parser in SUBCOMMANDS:
        add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `train --nproc N` hands each rank
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as e:
        say(f"error: {e}")
        return 2
    except Interrupted:
        return 130
    except KeyboardInterrupt:
        say("interrupted; nothing half-written was kept")
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # a full disk, a folder not writable, a file where a folder should be: one line
        from knnformer.io import describe_os_error

        say(f"error: {describe_os_error(e)}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
