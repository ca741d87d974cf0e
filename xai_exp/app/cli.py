"""The command line: ``xai-exp run [overrides]`` and ``xai-exp compare ...``.

``run`` hands its arguments to the Hydra application unchanged (``-m``, ``--cfg job``,
``--help`` and every override work as with ``python run.py``); ``compare`` reads what the
studies logged to MLflow. ``python -m xai_exp`` is the same command.

Exit codes: 0 done, 2 a usage or store error (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from xai_exp.app.versions import version_line

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "xai-exp"
DEFAULT_OUT = "comparison"


class VersionAction(argparse.Action):
    """``--version``: the versions on one line (argparse's own action wraps it), exit 0."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per action."""
    parser = argparse.ArgumentParser(
        prog="xai-exp",
        description=(
            "Compare image explanations: a CAM method against LIME or another explainer, "
            "logged to MLflow."
        ),
    )
    parser.add_argument(
        "--version",
        action=VersionAction,
        help="print the versions of xai-exp, torch, torchvision, grad-cam, lime, ... and exit",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    commands.add_parser(
        "run",
        help="run a study (Hydra: xai-exp run [overrides], xai-exp run -m ... for sweeps)",
        add_help=False,
    )
    compare = commands.add_parser(
        "compare",
        help="group runs by settings, summarise IoU, write a table, a plot and an HTML report",
        description="Group the study runs of an experiment (or of one sweep parent) by every "
        "setting that changes results (shards of one study pool into one row); print the table "
        "(means with 95% bootstrap intervals) and the paired comparisons of settings that "
        "differ in one key (mean difference, interval, Wilcoxon p), and write comparison.csv, "
        "paired.csv, iou_per_image.csv, iou_vs_threshold.png and a self-contained report.html. "
        "With --parent, the files are also logged to the parent run under comparison/.",
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
        "--plugin",
        metavar="MODULE",
        action="append",
        default=[],
        help="a module that registers more metrics (as metrics.plugins in the runs); repeatable",
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

    from xai_exp.compare.comparison import CompareError, compare, format_table, terminal_view
    from xai_exp.compare.method_agreement import as_matrix
    from xai_exp.config import ConfigError
    from xai_exp.errors import describe
    from xai_exp.explain.registry import load_plugins
    from xai_exp.track.runs import TrackingError, bound_http_retries, redact_uri, scrub

    bound_http_retries()  # a lost server: bounded time, not MLflow's minutes per call
    try:
        load_plugins(args.plugin)
        comparison = compare(args.tracking_uri, args.experiment, args.parent, args.out)
    except (CompareError, TrackingError, ConfigError) as error:
        print(f"xai-exp compare: {error}", file=sys.stderr)
        return 2
    except (MlflowException, OSError) as error:
        print(
            f"xai-exp compare: reading {redact_uri(args.tracking_uri)} failed "
            f"({scrub(describe(error), args.tracking_uri)})",
            file=sys.stderr,
        )
        return 2
    print(format_table(terminal_view(comparison.table)))
    print("(the intervals of every mean are in comparison.csv)")
    print()
    for line in comparison.findings():
        print(line)
    print()
    if not comparison.paired.empty:
        print("paired comparisons (mean difference a - b on shared images, 95% CI, Wilcoxon):")
        print(format_table(comparison.paired))
        print()
    methods = comparison.methods
    groups = methods.groupby(["others", "cam_top_fraction"], sort=False) if len(methods) else []
    for (others, fraction), pairs in groups:
        for value in ("mean_top_f_iou", "mean_spearman"):
            print(f"method agreement, {value} (top {fraction:g}; {others or 'all runs'}; "
                  f"n >= {int(pairs['images'].min())} shared images):")  # fmt: skip
            print(as_matrix(pairs, value).round(3).to_string())
            print()
    for path in comparison.files.values():
        print(f"wrote {path}")
    if args.parent:
        print(f"logged {len(comparison.files)} files to run {args.parent} under comparison/")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments and run the sub-command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # Hydra parses the rest itself
        from xai_exp.app.hydra_app import main as run_studies

        return run_studies(argv[1:])
    from xai_exp.track import masking

    masking.remember(*argv)  # a password in --tracking-uri: masked in all that is printed
    masking.protect_output()
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        return _compare(args)
    return 2  # unreachable: argparse rejects unknown commands


def exit_fast(command: Callable[[], int]) -> NoReturn:
    """Run a command and end the process with its exit code, skipping the interpreter's
    teardown of module state (torch, mlflow, pandas: ~2.5 s on the reference machine).

    Exit handlers, logging and the standard streams are flushed first, as a normal exit does;
    an unexpected exception still ends in the usual traceback.
    """
    try:
        code = command()
    except SystemExit as stop:
        value = stop.code
        if isinstance(value, str):
            print(value, file=sys.stderr)
            code = 1
        else:
            code = int(value or 0)
    # What the interpreter's shutdown runs, in its order: non-daemon threads and the
    # executors registered with threading (loky's and concurrent.futures' process pools stop
    # their workers there), then the exit handlers (mlflow, multiprocessing, loggers).
    shutdown_threads = getattr(threading, "_shutdown", None)
    if shutdown_threads is not None:
        shutdown_threads()
    atexit._run_exitfuncs()
    exit_now(code)


def exit_now(code: int) -> NoReturn:
    """End the process with `code` at once: logging and the standard streams are flushed, and
    nothing of the interpreter's teardown runs (no thread joined, no exit handler)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def entry() -> NoReturn:
    """The `xai-exp` console script."""
    exit_fast(main)


if __name__ == "__main__":
    entry()
