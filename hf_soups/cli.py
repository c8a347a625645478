"""``hf-soups``: a thin command line over the Python API.

Each subcommand lives in its own module under :mod:`hf_soups.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to the function that runs it.
Command modules import only the standard library at their top; what a command needs (torch,
transformers, ...) is imported inside its ``run``, so ``--help`` and argument errors are
immediate.

Every failure a user can cause ends in one line on stderr and exit code 2; Ctrl-C in one line
and exit code 130, after the half-written output is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import sys
from typing import NoReturn

from hf_soups.errors import HfSoupsError

COMMANDS = ["demo", "merge", "soup", "wise-ft", "patch", "push", "card", "diagnose"]


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported like every other error: one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hf-soups", description="Model soups, WiSE-FT and weight averaging.")
    _add_common_options(parser, default=False)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"hf_soups.commands.{name.replace('-', '_')}").register(subparsers)
    # Also after the command (`hf-soups merge ... -q`); there they default to nothing, so that
    # the value given before the command stands.
    for command in subparsers.choices.values():
        _add_common_options(command, default=argparse.SUPPRESS)
    return parser


def _add_common_options(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument(
        "--debug", action="store_true", default=default, help="show tracebacks on errors"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="only warnings and errors"
    )


# "-0.5,1.5" or "-1:1:0.5": argparse takes a value starting with "-" for an option unless it is
# a single number.
_NEGATIVE_NUMBERS = re.compile(r"-\.?\d[\d.eE+-]*([,:][-+]?[\d.eE+-]*)*")


def _attach_negative_values(argv: list[str]) -> list[str]:
    """Write ``--weights -0.5,1.5`` as ``--weights=-0.5,1.5``, which argparse reads as meant
    (it would take ``-0.5,1.5`` for an unknown option)."""
    joined: list[str] = []
    for arg in argv:
        previous = joined[-1] if joined else ""
        if (
            _NEGATIVE_NUMBERS.fullmatch(arg)
            and previous.startswith("--")
            and "=" not in previous
            and previous != "--"
        ):
            joined[-1] = f"{previous}={arg}"
        else:
            joined.append(arg)
    return joined


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user's input, disk or network can cause (not bugs): shown as one line."""
    from safetensors import SafetensorError  # a full disk while writing weights

    return (HfSoupsError, OSError, ValueError, SafetensorError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_attach_negative_values(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(
            f"hf-soups {args.command}: interrupted; nothing half-written is left", file=sys.stderr
        )
        return 130
    except _user_errors() as error:
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"hf-soups {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    # Under ``accelerate launch`` a command leaves the process group open; a process exiting with
    # gloo's threads alive can abort ("terminate called without an active exception"), so the
    # launcher reports a finished run as failed. Only when torch was imported by the command.
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def entry_point() -> NoReturn:
    """The ``hf-soups`` command: :func:`main`, then an exit that skips the interpreter's
    teardown."""
    code = main()
    # Once torch is imported, tearing the interpreter down (freeing every module's objects one
    # by one) takes about 0.5 s: a sixth of a whole ViT-B/32 merge (benchmarks/README.md). Every
    # output is complete and closed by now, so, like mypy's ``util.hard_exit``, flush what is
    # buffered and leave without the teardown.
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing reaches it
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    entry_point()
