"""``gpuctl``, the operator's command line: cluster commands read and write etcd, agent commands
talk to one agent's HTTP API, ``check`` judges a whole deployment. It sits above both daemons
and imports from the library (``gpufleet``); neither daemon imports it."""
