"""Shared pieces of gpufleet: wire records, logging, config loading, systemd notify."""

__version__ = "0.1.0"
