"""The command line: ``app`` (typer commands), ``spec`` (the user-model contract), ``train``
(training helpers), ``demo``, ``track`` and ``plot``.  Loads typer, rich and matplotlib only here."""
