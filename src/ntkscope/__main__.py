"""``python -m ntkscope``: the command line (see :mod:`ntkscope.cli`)."""

from .cli.app import main

if __name__ == "__main__":
    main()
