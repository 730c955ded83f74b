"""argparse with the project's conventions, for gpuctl and the daemons' command lines.

- A usage error exits 64 (EX_USAGE, sysexits.h) with one line on stderr, not argparse's usage
  dump and exit 2 (2 is gpuctl's "unreachable").
- ``--version`` prints the installed version (``gpufleet.__version__``).
- :func:`shared_options` makes options valid before *and* after the subcommand, at any depth,
  as kubectl and etcdctl do: ``gpuctl nodes -o json`` = ``gpuctl -o json nodes``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NoReturn

from gpufleet import __version__
from gpufleet.facts import EX_USAGE


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit EX_USAGE (subcommands inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EX_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


class Options:
    """What :func:`shared_options` hands its ``add`` function: ``add_argument`` as usual.

    On the top-level parser the defaults apply; on a subcommand the default is SUPPRESS, so a
    value given before the subcommand is not overwritten by the subcommand's default (argparse
    copies every attribute of the subcommand's namespace into the main one). An option the
    subcommand defines itself is left to it."""

    def __init__(self, parser: argparse.ArgumentParser, top: bool, title: str | None = None) -> None:
        self._parser = parser
        self._top = top
        self._group: argparse._ActionsContainer = parser.add_argument_group(title) if title else parser

    def group(self, title: str) -> Options:
        """The next options under their own heading in ``--help``."""
        return Options(self._parser, self._top, title)

    def add_argument(self, *flags: str, **kwargs: Any) -> None:
        if not self._top:
            if any(f in self._parser._option_string_actions for f in flags):
                return
            kwargs["default"] = argparse.SUPPRESS
        self._group.add_argument(*flags, **kwargs)


def _subcommands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            out.extend(dict.fromkeys(action.choices.values()))  # aliases share one parser
    return out


def shared_options(parser: argparse.ArgumentParser, add: Callable[[Options], None], title: str | None = None) -> None:
    """Add options through ``add`` to ``parser`` and to every subcommand below it.

    Call it once the subcommands are registered."""
    add(Options(parser, True, None))

    def walk(p: argparse.ArgumentParser) -> None:
        for sub in _subcommands(p):
            add(Options(sub, False, title or "global options"))
            walk(sub)

    walk(parser)
