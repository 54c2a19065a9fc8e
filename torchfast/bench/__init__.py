"""Benchmarks, one module per suite (optim, clip, norm, attention, models, deploy, sharded), the shared
interleaved timer (timing.py), the suites as `torchfast bench` runs them (suites.py) and the report with
plots (report.py). benchmarks/bench_*.py (pytest-benchmark) build their cases from the same modules."""
