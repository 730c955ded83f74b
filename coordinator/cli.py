"""``gpu-coordinator`` command line: run the daemon, or check a config file."""

from __future__ import annotations

import argparse
import sys

from gpufleet.cliargs import Options, Parser, add_version, shared_options
from gpufleet.logsetup import print_error
from gpufleet.tomlconfig import EX_CONFIG, ConfigError

from .config import DEFAULT_CONFIG_PATH, config_warnings, load_config


def _config_option(opts: Options) -> None:
    opts.add_argument("--config", default=DEFAULT_CONFIG_PATH, help=f"TOML config (default {DEFAULT_CONFIG_PATH})")


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="gpu-coordinator", description="Leader-elected brain of a gpufleet cluster.")
    add_version(p)
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("run", help="run the daemon (the default)")
    chk = sub.add_parser("check-config", help="validate a config file and exit (78 on problems)")
    chk.add_argument("file", nargs="?", help="config file (default: --config)")
    shared_options(p, _config_option)  # --config before or after the subcommand
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = (args.file if args.cmd == "check-config" else None) or args.config
    try:
        cfg = load_config(path)
    except ConfigError as e:
        print_error(str(e))
        return EX_CONFIG
    warnings = config_warnings(cfg)
    if args.cmd == "check-config":
        for w in warnings:
            print_error(f"{path}: warning: {w.path}: {w.message}")
        print(f"{path}: ok (cluster {cfg.etcd.cluster}, {len(cfg.etcd.endpoints)} etcd endpoints)")
        return 0

    import structlog
    import uvloop

    from gpufleet.logsetup import configure_logging

    from .daemon import CoordinatorRuntime

    configure_logging(cfg.coordinator.log_format, cfg.coordinator.log_level)
    structlog.contextvars.bind_contextvars(coordinator=cfg.id)
    for w in warnings:
        structlog.get_logger("coordinator").warning("config_warning", field=w.path, problem=w.message)
    return uvloop.run(CoordinatorRuntime(cfg).run())


if __name__ == "__main__":
    sys.exit(main())
