"""The command line: ``app`` (typer commands), ``spec`` (the user-model contract), ``train``
(training helpers), ``compare`` (estimates next to exact values), ``demo``, ``track`` and
``plot``.  Loads typer, rich and matplotlib only here."""
