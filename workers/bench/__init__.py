"""Benchmarks: our engine beside a baseline run in the same process (shardserve bench)."""
