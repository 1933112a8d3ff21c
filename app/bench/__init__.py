"""`textgen bench` and the profiles: a fixed mixed workload against HTTP servers, kernel and step timings.
Prints tables, asserts nothing; imported by the CLI alone."""

from app.bench.runner import add_arguments, run_bench

__all__ = ["add_arguments", "run_bench"]
