"""``python -m ntkscope``: the command line (see :mod:`ntkscope.cli`)."""

from .cli import main

if __name__ == "__main__":
    main()
