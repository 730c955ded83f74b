"""Development tools, not needed on a production host: ``gpuctl demo``, the simulated vLLM
server (a faithful test double of ``vllm serve`` used by the demo, the tests, the benchmarks and
the deployment tests), and the local-fleet harness that starts etcd, agents and coordinators as
processes for all of them."""
