"""``python -m knnformer.cli``: the ``knnformer`` command."""

import sys

from knnformer.cli import main

sys.exit(main())
