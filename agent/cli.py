"""``gpu-agent`` command line: run the daemon, or check a config file (gpufleet/daemoncli.py)."""

from __future__ import annotations

import sys

from agent.config import DEFAULT_CONFIG_PATH, AgentConfig, config_warnings, load_config
from gpufleet.daemoncli import Checked, DaemonCli, LogSettings
from gpufleet.tlsconfig import file_problems, key_warnings
from gpufleet.tokenfile import token_file_problems
from gpufleet.tomlconfig import ConfigProblem


def _check(cfg: AgentConfig) -> Checked:
    # The token file is checked as the agent will at start-up: others writing it is an error.
    errors, warnings = token_file_problems(cfg.agent.admin_token_file)
    token = "$.agent.admin_token_file"
    return Checked(
        summary=f"{len(cfg.instances)} instances, gpu source {cfg.gpu.source}",
        # The certificate, key and CA files as the agent will load them (exit 78 at start-up).
        errors=[*(ConfigProblem(token, p) for p in errors), *file_problems(cfg.tls)],
        warnings=[*(ConfigProblem(token, p) for p in warnings), *key_warnings(cfg.tls), *config_warnings(cfg)],
        # Valid (a test or staging host), but usually a file cut short: say so.
        notes=["no [[instances]] and no [cluster] endpoints: it runs nothing"]
        if not cfg.instances and not cfg.cluster.enabled
        else [],
    )


CLI = DaemonCli(
    prog="gpu-agent",
    description="Supervise GPU model servers on this host.",
    default_config=DEFAULT_CONFIG_PATH,
    load=load_config,
    check=_check,
    logging=lambda cfg: LogSettings(cfg.agent.log_format, cfg.agent.log_level, {"node": cfg.node_id}),
    runtime="agent.daemon:AgentRuntime",
    logger="agent",
    start_warnings=config_warnings,
)

main = CLI.main


if __name__ == "__main__":
    sys.exit(main())
