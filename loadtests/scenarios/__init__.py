"""Benchmark scenarios that start the project's app and run :mod:`loadtests` against it."""
