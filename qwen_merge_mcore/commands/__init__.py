"""One module per `qmm` subcommand (see cli.py for the contract)."""
