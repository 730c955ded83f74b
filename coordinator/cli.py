"""``gpu-coordinator`` command line: run the daemon, or check a config file."""

from __future__ import annotations

import argparse
import sys

from gpufleet.logsetup import print_error
from gpufleet.tomlconfig import EX_CONFIG, ConfigError

from .config import DEFAULT_CONFIG_PATH, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu-coordinator", description="Leader-elected brain of a gpufleet cluster.")
    p.add_argument("--config", default=DEFAULT_CONFIG_PATH, help=f"TOML config (default {DEFAULT_CONFIG_PATH})")
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("run", help="run the daemon (the default)")
    chk = sub.add_parser("check-config", help="validate a config file and exit (78 on problems)")
    chk.add_argument("file", nargs="?")
    args = p.parse_args(argv)
    path = (args.file if args.cmd == "check-config" else None) or args.config
    try:
        cfg = load_config(path)
    except ConfigError as e:
        print_error(str(e))
        return EX_CONFIG
    if args.cmd == "check-config":
        print(f"{path}: ok (cluster {cfg.etcd.cluster}, {len(cfg.etcd.endpoints)} etcd endpoints)")
        return 0

    import structlog
    import uvloop

    from gpufleet.logsetup import configure_logging

    from .daemon import CoordinatorRuntime

    configure_logging(cfg.coordinator.log_format, cfg.coordinator.log_level)
    structlog.contextvars.bind_contextvars(coordinator=cfg.id)
    return uvloop.run(CoordinatorRuntime(cfg).run())


if __name__ == "__main__":
    sys.exit(main())
