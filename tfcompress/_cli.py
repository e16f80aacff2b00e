"""What the ``python -m tfcompress.*`` commands share: absl start-up with help that exits 0."""

from __future__ import annotations

import sys
from typing import Callable


def run(main: Callable[[list[str]], int]) -> None:
    """``app.run(main)``, exiting with ``main``'s return code (0 after ``--help``, 2 for usage errors)."""
    from absl import app

    asked_help = any(a in ("--help", "-h", "-?", "--helpshort", "--helpfull") for a in sys.argv[1:])
    try:
        app.run(lambda argv: sys.exit(main(argv)))
    except SystemExit as e:
        if asked_help and e.code == 1:  # absl exits 1 after printing the help it was asked for
            sys.exit(0)
        raise
