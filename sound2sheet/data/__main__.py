"""`python -m sound2sheet.data check DATASET`: validate a dataset before training, reporting every problem at once."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .manifest import DEFAULT_DURATION_TOLERANCE, check_dataset


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command; returns the exit code: 0 when the dataset is clean, 1 when it has problems (each printed on
    one line to stdout, the count to stderr); argparse exits with 2 on bad arguments."""
    parser = argparse.ArgumentParser(prog="python -m sound2sheet.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate DATASET/{train,val,test}/manifest.json and the files they name")
    check.add_argument("dataset", help="dataset folder")
    check.add_argument("--duration-tolerance", type=float, default=DEFAULT_DURATION_TOLERANCE,
                       help="seconds the manifest's duration may differ from the audio's (default %(default)s)")
    args = parser.parse_args(argv)
    problems = check_dataset(args.dataset, duration_tolerance=args.duration_tolerance)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} found in {args.dataset}", file=sys.stderr)
        return 1
    print(f"{args.dataset}: no problems found")
    return 0


__all__ = ["main"]


if __name__ == "__main__":
    sys.exit(main())
