"""Load tests and benchmarks for vendgate."""
