"""``python -m qstack``: the same as the ``qstack`` console script."""

import sys

from qstack.cli import main

if __name__ == "__main__":
    sys.exit(main())
