"""Tooling that built and measures the embedded model and sample styles; run from a checkout
(`python -m tools.NAME`), not installed. See tools/README.md."""
