"""Benchmarks behind `scripts/bench.py <subcommand>`: one module per subcommand, each with `run(...) -> dict`."""
