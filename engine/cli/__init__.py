"""`tsdpo`: every engine capability without a display. Errors end in one clear line and a non-zero exit.

One module per command group (``model``, ``data``, ``build``, ``generate``, ``export``, ``sweep``), each adding
its parsers; the option groups they share and the helpers for reading values live in ``common``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from engine.cli import build, data, export, generate, model, study, sweep
from engine.cli.common import EXIT_USER_ERROR
from engine.errors import TsdpoError

COMMAND_GROUPS = (model, data, generate, build, sweep, export, study)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsdpo", description="Preference mixing: directions, steering, generation, export.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_parsers(sub)
    return parser


_NEGATIVE_OK = ("--weights", "--mix", "--point", "--range", "--reference")


def _join_negative_values(argv: list[str]) -> list[str]:
    """Let `--weights -1,0,1` work: argparse would read '-1,0,1' as an option."""
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a in _NEGATIVE_OK:
            nxt = next(it, None)
            out.append(a if nxt is None else f"{a}={nxt}")
        else:
            out.append(a)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except TsdpoError as exc:
        if args.debug:
            raise
        print(f"tsdpo: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("tsdpo: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"tsdpo: unexpected error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1

