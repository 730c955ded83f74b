"""gpu-agent: supervises model servers on one GPU host and serves its API and proxy."""
