"""One-off probes, each a `python -m bench.probes.<name>` command that measures one question.

They are not part of `make test` or `make bench`; the numbers they give belong in
docs/performance.md, not in docstrings.
"""
