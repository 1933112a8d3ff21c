"""`textgen bench`: a fixed mixed workload against HTTP servers; prints a table, asserts nothing."""

from app.bench.runner import add_arguments, run_bench

__all__ = ["add_arguments", "run_bench"]
