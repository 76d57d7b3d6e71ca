"""The ``graphdrivers`` command line: the parser, dispatch to one module per verb, exit codes.

Verbs mirror the Driver interface one for one (create, rm, ls, mount/get, umount/put, diff,
apply, changes, status), plus image import/export, the conformance suite, ``compare`` (run
every backend this host supports over one layer stack) and ``doctor`` (which backends can run
here, and what is missing). Global options pick the driver and its home::

    graphdrivers [--driver NAME|module:Factory] [--home DIR] [-o key=value]... [-v] VERB ...

Errors print one line, ``graphdrivers: error: <message>``, on stderr (a traceback too with
``-v``) and exit with a documented code:

====  =========================================================================
code  meaning
====  =========================================================================
0     success
1     any other DriverError (MountError, QuotaExceeded...)
2     usage error: bad arguments, or binary output refused on a terminal
3     LayerNotFound, ParentNotFound
4     LayerExists
5     LayerBusy, LayerHasChildren, NotMounted
6     InvalidArchive, BreakoutError
7     NotSupported (this host lacks something the driver needs)
8     InvalidLayerId, InvalidOption
130   interrupted (Ctrl-C)
====  =========================================================================

``graphdrivers conformance`` exits with pytest's status instead (0 passed, 1 failures...).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable, Sequence

from graphdrivers.cli import (
    apply,
    changes,
    compare,
    conformance,
    create,
    diff,
    doctor,
    export,
    import_,
    ls,
    mount,
    rm,
    status,
    umount,
)
from graphdrivers.cli.common import (
    DEFAULT_DRIVER,
    EXIT_INTERRUPTED,
    PROG,
    error_line,
    exit_code_for,
)
from graphdrivers.errors import DriverError

log = logging.getLogger(__name__)

VERBS = (
    create,
    rm,
    ls,
    mount,
    umount,
    diff,
    apply,
    changes,
    status,
    import_,
    export,
    conformance,
    compare,
    doctor,
)

Handler = Callable[[argparse.Namespace], int]


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every verb takes, before or after the verb's name.

    The copy on each verb uses SUPPRESS defaults so that it only overrides what was given.
    """

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--driver",
        default=default(DEFAULT_DRIVER),
        metavar="NAME",
        help="driver name or package.module:Factory (default: vfs)",
    )
    parser.add_argument(
        "--home",
        default=default(None),
        metavar="DIR",
        help="driver home (default: $XDG_DATA_HOME/graphdrivers/<driver>)",
    )
    parser.add_argument(
        "-o",
        "--option",
        action="append",
        default=default(None),
        metavar="KEY=VALUE",
        help="driver option (repeatable)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default(0),
        help="log progress (-vv for debug) and show tracebacks",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Container graph drivers in Python: manage layers, test and compare drivers.",
    )
    _global_options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, defaults=False)

    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for module in VERBS:
        module.register(sub, common)
    return parser


def split_pytest_args(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """Split ``conformance ... -- PYTEST ARGS`` at the ``--``, so pytest gets the rest whole.

    argparse cannot mix options and a trailing free list reliably; only the conformance
    verb takes one, so ``--`` keeps its usual meaning for every other verb.
    """
    if "--" in argv and "conformance" in argv[: argv.index("--")]:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    return argv, None


def _setup_logging(verbosity: int) -> None:
    level = logging.DEBUG if verbosity > 1 else logging.INFO if verbosity else logging.WARNING
    logging.basicConfig(level=level, format=f"{PROG}: %(levelname)s: %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb and return its exit code (the console script exits with it)."""
    parser = build_parser()
    words, pytest_args = split_pytest_args(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(words)
    if pytest_args is not None:
        args.pytest_args = pytest_args
    _setup_logging(args.verbose)
    handler: Handler = args.func

    try:
        return handler(args)
    except KeyboardInterrupt:
        error_line("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (``| head``): not an error worth a message.
        sys.stderr.close()
        return 0
    except (DriverError, OSError, Exception) as exc:
        if args.verbose:
            traceback.print_exc()
        if not isinstance(exc, DriverError):
            log.debug("unexpected %s", type(exc).__name__)
        error_line(exc if isinstance(exc, DriverError) else _describe(exc))
        return exit_code_for(exc)


def _describe(exc: BaseException) -> str:
    from graphdrivers.cli.common import UsageError

    if isinstance(exc, UsageError):
        return str(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.strerror or exc} ({exc.filename})"
    return f"{type(exc).__name__}: {exc}"


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
