"""One module per `vendgate` subcommand (see gateway/cli/__init__.py)."""
