"""``python -m simmerge_lib.engine RECIPE OUT``: see :func:`simmerge_lib.engine.cli.main`."""

from .cli import main

raise SystemExit(main())
