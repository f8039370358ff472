"""Benchmarks that compare opsbook with what users do today (DESIGN §9); see bench/README.md."""
