"""Shared pieces of gpufleet: wire records, logging, config loading, systemd notify."""

from importlib.metadata import PackageNotFoundError, version

try:
    # One place for the version (pyproject.toml): an upgraded agent reports what it runs.
    __version__ = version("gpufleet")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
