"""``gpu-agent`` command line: run the daemon, or check a config file."""

from __future__ import annotations

import argparse
import sys

from agent.config import DEFAULT_CONFIG_PATH, config_warnings, load_config
from gpufleet.cliargs import Options, Parser, add_version, shared_options
from gpufleet.logsetup import print_error
from gpufleet.tokenfile import token_file_problems
from gpufleet.tomlconfig import EX_CONFIG, ConfigError


def _config_option(opts: Options) -> None:
    opts.add_argument("--config", default=DEFAULT_CONFIG_PATH, help=f"TOML config (default {DEFAULT_CONFIG_PATH})")


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="gpu-agent", description="Supervise GPU model servers on this host.")
    add_version(p)
    sub = p.add_subparsers(dest="cmd")
    sub.add_parser("run", help="run the daemon (the default)")
    chk = sub.add_parser("check-config", help="validate a config file and exit (78 on problems)")
    chk.add_argument("file", nargs="?", help="config file (default: --config)")
    shared_options(p, _config_option)  # --config before or after the subcommand
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "check-config":
        path = args.file or args.config
        try:
            cfg = load_config(path)
        except ConfigError as e:
            print_error(str(e))
            return EX_CONFIG
        # The token file is checked as the agent will at start-up: others writing it is an error.
        errors, warnings = token_file_problems(cfg.agent.admin_token_file)
        for problem in errors:
            print_error(f"{path}: $.agent.admin_token_file: {problem}")
        for problem in warnings:
            print_error(f"{path}: warning: $.agent.admin_token_file: {problem}")
        for warning in config_warnings(cfg):
            print_error(f"{path}: warning: {warning.path}: {warning.message}")
        if errors:
            return EX_CONFIG
        print(f"{path}: ok ({len(cfg.instances)} instances, gpu source {cfg.gpu.source})")
        if not cfg.instances and not cfg.cluster.enabled:
            # Valid (a test or staging host), but usually a file cut short: say so.
            print(f"{path}: note: no [[instances]] and no [cluster] endpoints: it runs nothing", file=sys.stderr)
        return 0
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print_error(str(e))
        return EX_CONFIG

    from gpufleet.logsetup import configure_logging

    configure_logging(cfg.agent.log_format, cfg.agent.log_level)
    import structlog

    structlog.contextvars.bind_contextvars(node=cfg.node_id)
    for warning in config_warnings(cfg):
        structlog.get_logger("agent").warning("config_warning", field=warning.path, problem=warning.message)

    import uvloop

    from agent.daemon import AgentRuntime

    return uvloop.run(AgentRuntime(cfg).run())


if __name__ == "__main__":
    sys.exit(main())
