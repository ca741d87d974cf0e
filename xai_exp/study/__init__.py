"""The study: each cached step of one image's explanations and the per-image flow that turns
them into masks and metrics, over a stream of images.

May import: `data`, `models`, `explain`, `evaluate`, the shared modules. Never MLflow or Hydra.
"""
