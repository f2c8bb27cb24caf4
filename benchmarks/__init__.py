"""Benchmarks: each writes a JSON under benchmarks/results/ and prints a short table."""
