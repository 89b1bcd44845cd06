"""Benchmarks that print figures (see README.md); nothing here asserts time."""
