"""Command line: ``xai-exp compare ...`` (or ``python -m xai_exp compare ...``).

Running studies stays with Hydra (``python run.py [overrides]``); this command reads what the
studies logged to MLflow.

Exit codes: 0 done, 2 a usage or store error (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "xai-exp"
DEFAULT_OUT = "comparison"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per action."""
    parser = argparse.ArgumentParser(
        prog="xai-exp",
        description="Tools around the CAM-vs-LIME study's MLflow runs "
        "(run studies with: python run.py [overrides]).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    compare = commands.add_parser(
        "compare",
        help="group runs by settings, summarise IoU, write a table, a plot and an HTML report",
        description="Group the study runs of an experiment (or of one sweep parent) by method x "
        "cam_top_fraction x lime_mode x lime.num_samples; print the table and write "
        "comparison.csv, iou_vs_threshold.png and a self-contained report.html. With --parent, "
        "the files are also logged to the parent run under comparison/.",
    )
    compare.add_argument(
        "--tracking-uri",
        default=DEFAULT_URI,
        help=f"MLflow tracking URI: sqlite:///file.db or http://host:port (default: {DEFAULT_URI})",
    )
    compare.add_argument(
        "--experiment",
        default=DEFAULT_EXPERIMENT,
        help=f"experiment name (default: {DEFAULT_EXPERIMENT}; ignored with --parent)",
    )
    compare.add_argument(
        "--parent",
        metavar="RUN_ID",
        default=None,
        help="compare only the children of this sweep parent run and log the files to it",
    )
    compare.add_argument(
        "--out",
        type=Path,
        default=Path(DEFAULT_OUT),
        help=f"folder for the output files (default: ./{DEFAULT_OUT})",
    )
    return parser


def _compare(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from xai_exp.compare import CompareError, compare, format_table, redact_uri, scrub

    try:
        comparison = compare(args.tracking_uri, args.experiment, args.parent, args.out)
    except CompareError as error:
        print(f"xai-exp compare: {error}", file=sys.stderr)
        return 2
    except (MlflowException, OSError) as error:
        text = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        text = scrub(text, args.tracking_uri)
        print(
            f"xai-exp compare: reading {redact_uri(args.tracking_uri)} failed "
            f"({type(error).__name__}: {text})",
            file=sys.stderr,
        )
        return 2
    print(format_table(comparison.table))
    print()
    for path in comparison.files.values():
        print(f"wrote {path}")
    if args.parent:
        print(f"logged {len(comparison.files)} files to run {args.parent} under comparison/")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments and run the sub-command; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        return _compare(args)
    return 2  # unreachable: argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
