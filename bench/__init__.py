"""Benchmarks and recorded results (installed as dsah_rt.bench)."""
