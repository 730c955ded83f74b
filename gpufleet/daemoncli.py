"""The daemons' one command line: ``PROG [run] [--config F]``, ``PROG check-config [FILE]``,
``PROG --version``, with ``--config`` before or after the subcommand.

Written once for gpu-agent and gpu-coordinator (gpufleet/daemon.py is their one process
skeleton); each says only what is its own in a :class:`DaemonCli`: how its config loads, what
``check-config`` checks beyond loading and what its "ok" line says, how its logging is set up,
and which daemon runs. Exit codes: 78 (EX_CONFIG) for a config that does not load or has an
error, 64 for a usage error, 0 for a good config or a clean stop, else the daemon's.

What the daemon needs (uvloop, aiohttp, the daemon's modules) is imported only to run it:
``check-config`` stays quick.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, NamedTuple, TypeVar

from gpufleet.cliargs import Options, Parser, add_version, shared_options
from gpufleet.facts import EX_CONFIG
from gpufleet.logsetup import print_error
from gpufleet.tomlconfig import ConfigError, ConfigProblem

C = TypeVar("C")


class Checked(NamedTuple):
    """What ``check-config`` says of a config that loaded."""

    summary: str  # the "ok (...)" detail
    errors: Sequence[ConfigProblem] = ()  # beyond loading; any makes check-config exit 78
    warnings: Sequence[ConfigProblem] = ()  # legal but probably a mistake
    notes: Sequence[str] = ()  # said on stderr after the ok line


class LogSettings(NamedTuple):
    format: Literal["auto", "json", "console"]
    level: str
    context: dict[str, object]  # bound to every line of the process (the node, the coordinator id)


def _no_warnings(_: Any) -> list[ConfigProblem]:
    return []


@dataclass(frozen=True)
class DaemonCli(Generic[C]):
    prog: str
    description: str
    default_config: str
    load: Callable[[str], C]  # raises ConfigError naming the file and fields
    check: Callable[[C], Checked]
    logging: Callable[[C], LogSettings]
    # "module:Class" of the daemon (a gpufleet.daemon.DaemonBase taking the config), imported
    # only to run it, when it is looked up (tests replace it in its module).
    runtime: str
    logger: str  # the structlog logger the start-up warnings go to
    # Legal but probably a mistake: logged at start-up (check-config says them through ``check``).
    start_warnings: Callable[[C], list[ConfigProblem]] = _no_warnings
    # Further subcommands: given the subparsers; each sets ``handler=fn(args) -> exit code``.
    more_commands: Callable[[Any], None] | None = field(default=None)

    def parser(self) -> argparse.ArgumentParser:
        p = Parser(prog=self.prog, description=self.description)
        add_version(p)
        sub = p.add_subparsers(dest="cmd")
        sub.add_parser("run", help="run the daemon (the default)")
        chk = sub.add_parser("check-config", help="validate a config file and exit (78 on problems)")
        chk.add_argument("file", nargs="?", help="config file (default: --config)")
        if self.more_commands is not None:
            self.more_commands(sub)

        def config_option(opts: Options) -> None:
            opts.add_argument(
                "--config", default=self.default_config, help=f"TOML config (default {self.default_config})"
            )

        shared_options(p, config_option)  # --config before or after the subcommand
        return p

    def main(self, argv: list[str] | None = None) -> int:
        args = self.parser().parse_args(argv)
        handler = getattr(args, "handler", None)
        if handler is not None:
            return int(handler(args))
        path = (args.file if args.cmd == "check-config" else None) or args.config
        try:
            cfg = self.load(path)
        except ConfigError as e:
            print_error(str(e))
            return EX_CONFIG
        if args.cmd == "check-config":
            return self._check_config(path, cfg)
        return self._run(cfg)

    def _check_config(self, path: str, cfg: C) -> int:
        checked = self.check(cfg)
        for p in checked.errors:
            print_error(f"{path}: {p.path}: {p.message}")
        for p in checked.warnings:
            print_error(f"{path}: warning: {p.path}: {p.message}")
        if checked.errors:
            return EX_CONFIG
        print(f"{path}: ok ({checked.summary})")
        for note in checked.notes:
            print(f"{path}: note: {note}", file=sys.stderr)
        return 0

    def _run(self, cfg: C) -> int:
        import structlog
        import uvloop

        from gpufleet import logsetup  # looked up now: tests replace configure_logging

        settings = self.logging(cfg)
        logsetup.configure_logging(settings.format, settings.level)
        structlog.contextvars.bind_contextvars(**settings.context)
        for w in self.start_warnings(cfg):
            structlog.get_logger(self.logger).warning("config_warning", field=w.path, problem=w.message)
        module, name = self.runtime.split(":")
        daemon = getattr(importlib.import_module(module), name)(cfg)
        return int(uvloop.run(daemon.run()))
