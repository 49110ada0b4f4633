"""Benchmarks: each prints what it measured on this machine and the command that reproduces it."""
