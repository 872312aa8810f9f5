"""``python -m simmerge_lib.scale features A B BASE``: see :func:`simmerge_lib.scale.cli.main`."""

import sys

from .cli import main

raise SystemExit(main(sys.argv[1:]))
