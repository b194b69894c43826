"""``python -m visar ...``: the ``visar`` command line (:mod:`visar.cli`)."""
import sys

from visar.cli import main

if __name__ == "__main__":
    sys.exit(main())
