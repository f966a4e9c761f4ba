"""`moe-serve`: one entry point, one subcommand per job.

Each subcommand lives in its own module here (serving/cli/NAME.py) and registers itself through
`add_subcommand(subparsers)`, setting `func(args) -> int`. A user-facing error anywhere
(serving/errors.py USER_ERRORS) becomes one line on stderr and exit status 2, so a user never sees
a traceback for a mistake of theirs or a fault of their checkpoint or cluster.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from serving.errors import USER_ERRORS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-serve",
        description="Serve top-2 Mixture-of-Experts models on Ray, honestly measured.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Imported here, not at the top, so that importing this module stays light.
    from serving.cli import balance, bench, dashboard, generate, plan, status, up

    for module in (generate, plan, balance, up, bench, status, dashboard):
        module.add_subcommand(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to start itself again (up)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        print(f"moe-serve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
