"""Benchmarks: retention ops, inference and training cost, and quality against a same-size Transformer."""
