"""`moe-serve`: the command line, one module per subcommand (serving/cli/command.py)."""

from serving.cli.command import main

__all__ = ["main"]
