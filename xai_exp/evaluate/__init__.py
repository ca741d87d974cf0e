"""Evaluation: masks from maps, overlap and chance (`overlap`), threshold-free agreement,
faithfulness, sanity, localisation, statistics, and the per-image metric registry (`results`).

May import: `models`, the shared modules. Never MLflow or Hydra.
"""
