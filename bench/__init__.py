"""Benchmarks of attnserve: the real server under load against the in-process limit.

`python -m bench.run` (or `make bench`) starts the server, drives it with `bench.loadgen`,
measures the same pipeline without HTTP with `bench.inprocess` and writes `bench.report` files.
One-off probes, outside `make test`, live in `bench.probes`.
"""
