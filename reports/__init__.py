"""Outputs of a run: results.json, samples.csv and the self-contained HTML report."""
