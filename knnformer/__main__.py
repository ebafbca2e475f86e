"""``python -m knnformer`` (and ``torchrun ... -m knnformer train ...``): the ``knnformer`` command."""

import sys

from knnformer.cli import main

if __name__ == "__main__":
    sys.exit(main())
