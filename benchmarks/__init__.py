"""Benchmarks that print speed figures next to a reference measured in the same run."""
