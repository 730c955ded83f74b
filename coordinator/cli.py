"""``gpu-coordinator`` command line: run the daemon, or check a config file (gpufleet/daemoncli.py)."""

from __future__ import annotations

import sys

from gpufleet.daemoncli import Checked, DaemonCli, LogSettings
from gpufleet.tlsconfig import file_problems, key_warnings

from .config import DEFAULT_CONFIG_PATH, CoordinatorConfig, config_warnings, load_config


def _check(cfg: CoordinatorConfig) -> Checked:
    return Checked(
        summary=f"cluster {cfg.etcd.cluster}, {len(cfg.etcd.endpoints)} etcd endpoints",
        errors=file_problems(cfg.tls),  # the certificate and key as the coordinator will load them
        warnings=[*key_warnings(cfg.tls), *config_warnings(cfg)],
    )


CLI = DaemonCli(
    prog="gpu-coordinator",
    description="Leader-elected brain of a gpufleet cluster.",
    default_config=DEFAULT_CONFIG_PATH,
    load=load_config,
    check=_check,
    logging=lambda cfg: LogSettings(cfg.coordinator.log_format, cfg.coordinator.log_level, {"coordinator": cfg.id}),
    runtime="coordinator.daemon:CoordinatorRuntime",
    logger="coordinator",
    start_warnings=config_warnings,
)

main = CLI.main


if __name__ == "__main__":
    sys.exit(main())
