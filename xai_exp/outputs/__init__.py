"""Outputs on disk: results.csv, per-image arrays, overlays, plots.

May import: `data`, `models`, `evaluate`, the shared modules. Never MLflow or Hydra.
"""
